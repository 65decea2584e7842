"""Steps of a kernel's start that need no kernel state: the upload before it, the reach check
after it (a kernel on another machine than the SSH host), and the one line for a failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import asyncssh

from .errors import LaunchError
from .kernel_settings import KernelSettings
from .ssh import Connection
from .sync_channel import SyncChannel, SyncError
from .transfer import push
from .workdir import upload_targets

LOG_TAIL_LINES = 6


async def upload(
    conn: Connection, settings: KernelSettings, local_dir: str, cwd: str | None, log: logging.Logger
) -> None:
    """Copy the ``upload`` entries to the remote side (only what changed)."""
    started = time.monotonic()
    assert conn.ssh is not None
    targets = upload_targets(settings.upload, local_dir, settings.path_map, cwd)
    channel = await SyncChannel.open(conn.ssh, settings.python, settings.target.host)
    copied = sent = unchanged = 0
    try:
        for (local, remote), entry in zip(targets, settings.upload):
            try:
                result = await push(channel, local, remote)
            except SyncError as exc:
                raise LaunchError(f"upload of {entry!r} failed: {exc}") from None
            copied, sent = copied + len(result.copied), sent + result.bytes
            unchanged += result.unchanged
    finally:
        await channel.close()
    log.info("Uploaded %d file(s) (%d bytes) to %s in %.2f s; %d unchanged", copied, sent,
             settings.target.host.alias, time.monotonic() - started, unchanged)  # fmt: skip


async def reach_error(
    conn: Connection, label: str, reply: Mapping[str, Any], settings: KernelSettings
) -> LaunchError | None:
    """None if the SSH host reaches the kernel's heartbeat port (where ``reply`` says it
    listens, on ``label``), else why not, as one line."""
    assert conn.ssh is not None
    ip, port = str(reply.get("ip")), int(reply["endpoints"]["hb"])
    try:
        _, session = await asyncio.wait_for(
            conn.ssh.open_connection(ip, port), settings.connect_timeout
        )
        session.close()
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        return LaunchError(
            f"{settings.target.host.label} cannot reach the kernel's port {port} on {label} at "
            f"{ip}: {getattr(exc, 'reason', '') or exc or 'timeout'}; the login node must be "
            f"allowed to connect to the nodes (and sshd there to forward TCP: "
            f"AllowTcpForwarding)"
        )
    return None


def launch_failure(reply: Mapping[str, Any], settings: KernelSettings) -> LaunchError:
    """The agent's refusal of a launch, with the end of the kernel's output."""
    error = str(reply.get("error", "the kernel did not start"))
    tail_lines = [line for line in str(reply.get("log_tail", "")).splitlines() if line.strip()]
    tail = " | ".join(tail_lines[-LOG_TAIL_LINES:])
    where = settings.target.host.label
    if "No module named ipykernel" in tail:
        python = settings.python
        return LaunchError(
            f"ipykernel is not installed for {python} on {where}; install it there with "
            f"`{python} -m pip install ipykernel`"
        )
    if "did not start listening" in error:
        error += " (raise launch_timeout if the kernel is slow to start)"
    return LaunchError(
        f"remote kernel on {where}: {error}" + (f"; its output: {tail}" if tail else "")
    )


def unencrypted_on_network(node: str) -> LaunchError:
    """A kernel on a network address (a Slurm node's) whose spec does not declare Curve."""
    return LaunchError(
        f"the kernel would listen unencrypted on the network of {node}; "
        f'declare "supported_encryption": ["curve"] in kernel.json\'s metadata '
        f"(`remote_kernel add` does for ipykernel) so that it runs with CurveZMQ"
    )
