"""Many kernels on one host share one SSH connection, past sshd's MaxSessions (10)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from jupyter_client.manager import AsyncKernelManager

from drivers import Driver
from kernels import own_sockets, remote_kernel_dirs, run_cell

pytestmark = pytest.mark.timeout(240)

KERNELS = 20


def ssh_connections_to(port: int) -> int:
    """Established TCP connections from this process to ``port`` on loopback."""
    own = own_sockets()
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if fields[3] == "01" and remote_port == port and fields[9] in own:
                count += 1
    return count


def test_twenty_kernels_share_one_connection(remote_spec, ssh_env, remote_tmp, no_leftovers):
    assert "MaxSessions 10" in ssh_env.server.config.read_text()
    name = remote_spec()

    async def scenario() -> list[str]:
        managers = [AsyncKernelManager(kernel_name=name) for _ in range(KERNELS)]
        try:
            await asyncio.gather(*(km.start_kernel() for km in managers))
            assert ssh_connections_to(ssh_env.port) == 1
            assert len(remote_kernel_dirs(remote_tmp)) == KERNELS
            outputs = []
            for i, km in enumerate(managers):
                kc = km.client()
                kc.start_channels()
                await kc.wait_for_ready(timeout=60)
                out: list[str] = []
                await kc.execute_interactive(
                    f"print({i} * 2)", timeout=30,
                    output_hook=lambda m, out=out: out.append(m["content"].get("text", "")),
                )  # fmt: skip
                kc.stop_channels()
                outputs.append("".join(out).strip())
            return outputs
        finally:
            await asyncio.gather(
                *(km.shutdown_kernel(now=True) for km in managers if km.has_kernel)
            )

    assert asyncio.run(scenario()) == [str(i * 2) for i in range(KERNELS)]


def test_key_never_logged(remote_spec, no_leftovers, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("asyncssh", "traitlets", "jupyter_remote_provisioner"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        driver = Driver("async", remote_spec())
        try:
            driver.start()
            key = driver.km.session.key.decode()
            run_cell(driver.client(), "x = 1")
            driver.restart()
            driver.shutdown()
        finally:
            driver.close()
    finally:
        for name in ("asyncssh", "traitlets", "jupyter_remote_provisioner"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert "Remote kernel" in caplog.text, "the lifecycle was logged"
    assert key not in caplog.text
