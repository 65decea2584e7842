"""Drive a kernel through either jupyter_client manager with one blocking test API.

``AsyncKernelManager`` (jupyter_server, nbclient) runs on an event loop that sits idle
between calls here, and the blocking ``KernelManager`` (jupyter console, scripts) runs each
call on a loop of its own: both are how real callers leave the provisioner's loop alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager, KernelManager

from kernels import run_cell

KINDS = ("async", "blocking")
WHERE = "import os; print(os.environ['SSH_CONNECTION'])"


class Driver:
    """A kernel manager of either kind, with blocking methods."""

    def __init__(self, kind: str, kernel_name: str) -> None:
        self.kind = kind
        self._loop = asyncio.new_event_loop() if kind == "async" else None
        manager_class = AsyncKernelManager if kind == "async" else KernelManager
        self.km: KernelManager = manager_class(kernel_name=kernel_name)
        self._clients: list[BlockingKernelClient] = []

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.km, method)(*args, **kwargs)
        if self._loop is not None:
            return self._loop.run_until_complete(result)
        return result

    def start(self, **kwargs: Any) -> None:
        """Start the kernel; ``cwd`` is the notebook's directory, as jupyter_server passes it."""
        self._run("start_kernel", **kwargs)

    def client(self) -> BlockingKernelClient:
        """A blocking client on the kernel's (local, forwarded) ports, ready to execute."""
        kc = BlockingKernelClient()
        kc.load_connection_info(self.km.get_connection_info())
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        self._clients.append(kc)
        return kc

    def interrupt(self) -> None:
        self._run("interrupt_kernel")

    def restart(self) -> None:
        self._run("restart_kernel")

    def is_alive(self) -> bool:
        return bool(self._run("is_alive"))

    def shutdown(self, now: bool = False) -> None:
        for kc in self._clients:
            kc.stop_channels()
        self._clients.clear()
        if self.km.has_kernel:
            self._run("shutdown_kernel", now=now)

    def close(self) -> None:
        """Shut down whatever is still running and close the private loop."""
        try:
            self.shutdown(now=True)
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    @property
    def provisioner(self) -> Any:
        return self.km.provisioner


def ssh_connection_of(kind: str, kernel_name: str) -> str:
    """Start a kernel of ``kernel_name``, shut it down, and return the ``SSH_CONNECTION`` it
    ran under: client address and port, server address and port."""
    driver = Driver(kind, kernel_name)
    try:
        driver.start()
        out, reply = run_cell(driver.client(), WHERE)
        assert reply["status"] == "ok", reply
        driver.shutdown()
        return out.strip()
    finally:
        driver.close()
