"""Many kernels on one host share one SSH connection, past sshd's MaxSessions (10)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from jupyter_client.manager import AsyncKernelManager

from drivers import Driver
from kernels import (
    own_sockets,
    remote_base,
    remote_kernel_dirs,
    remote_processes,
    run_cell,
    wait_for,
)

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


async def sessions_allowed(ssh_env: Any, tries: int) -> int:
    """How many of ``tries`` concurrent sessions (exec channels) sshd grants one connection."""
    conn = await asyncssh.connect(
        ssh_env.host, ssh_env.port, username=ssh_env.user,
        client_keys=[str(ssh_env.identity_file)], known_hosts=str(ssh_env.known_hosts),
    )  # fmt: skip
    granted = 0
    try:
        for _ in range(tries):
            try:
                await conn.create_session(asyncssh.SSHClientSession, "cat")  # ends at EOF
            except asyncssh.ChannelOpenError:
                break
            granted += 1
    finally:
        conn.close()
        await conn.wait_closed()
    return granted


def test_twenty_kernels_share_one_connection(remote_spec, ssh_env, remote_tmp, no_leftovers):
    assert asyncio.run(sessions_allowed(ssh_env, 11)) == 10, "sshd's MaxSessions is 10"
    wait_for(lambda: not remote_processes(remote_tmp), 10, "the probe's sessions to end")
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


@contextlib.contextmanager
def command_lines() -> Iterator[set[str]]:
    """Every command line on this machine while the block runs (read from /proc every few
    ms): what `ps` could have shown at any moment, not only once."""
    seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                with contextlib.suppress(OSError):
                    seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def test_key_never_in_a_command_line_or_a_log(remote_spec, ssh_env, remote_tmp, no_leftovers,
                                              caplog):  # fmt: skip
    """The session key is in no command line at any moment of a kernel's life, and in no log:
    ours (at DEBUG, asyncssh's too), the remote daemon's, the kernel's, sshd's."""
    caplog.set_level(logging.DEBUG)
    for name in ("asyncssh", "traitlets", "jupyter_remote_provisioner"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    remote_logs: list[str] = []
    try:
        with command_lines() as seen:
            driver = Driver("async", remote_spec())
            try:
                driver.start()
                key = driver.km.session.key.decode()
                run_cell(driver.client(), "x = 1")
                driver.restart()
                base = remote_base(remote_tmp)
                for log in [*base.glob("*/kernel.log"), *Path(f"{base}-agent").glob("*.log")]:
                    remote_logs.append(log.read_text(errors="replace"))
                driver.shutdown()
            finally:
                driver.close()
    finally:
        for name in ("asyncssh", "traitlets", "jupyter_remote_provisioner"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert "Remote kernel" in caplog.text, "the lifecycle was logged"
    assert len(remote_logs) >= 2, "the kernel's and the daemon's logs were read"
    assert any("ipykernel" in line for line in seen), "the kernel was sampled"
    for where, text in [("our log", caplog.text), ("sshd's log", ssh_env.server.log_text()),
                        *(("a remote log", t) for t in remote_logs),
                        *(("a command line", c) for c in seen)]:  # fmt: skip
        assert key not in text, f"the key is in {where}"
