"""Where a kernel runs: in front of the one kernel lifecycle (:mod:`..kernel`).

A :class:`Site` turns a kernel's settings into a :class:`Spot`: which remote agent starts the
kernel and where its ports are. A plain SSH host is its own spot (``host.py``); a Slurm
cluster gives a compute node inside a job submitted through the login node (``slurm.py``),
and the job is what must be undone at the end. The lifecycle asks the site at each start
and reconnect, tells it when the kernel ended, and releases it at shutdown: it never asks
which kind of site it has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..agent import RemoteAgent
    from ..errors import RemoteKernelError
    from ..kernel_settings import KernelSettings
    from ..ssh import Connection


@dataclass(frozen=True)
class Spot:
    """Where one kernel runs, as the lifecycle needs it."""

    label: str  # in messages: "gpu", "n1 (Slurm job 12)"
    agent_mode: str = "relay"  # how the agent bundle runs (see remote/__init__.py)
    launcher: tuple[str, ...] = ()  # argv that runs the agent's interpreter (srun ...)
    # the kernel's ports are on a network address, not loopback: they must be encrypted
    # (CurveZMQ), and are checked to be reachable from the SSH host
    network: bool = False


class Site(Protocol):
    """The choice of where a kernel runs, and what ending it there takes."""

    async def place(self, conn: Connection, renew: bool) -> Spot:
        """Where the kernel runs now. ``renew`` (a start or restart): make a new place if
        the old one is gone; else (a reconnect) raise :class:`~..errors.KernelGone`."""

    async def ended(self, conn: Connection) -> str | None:
        """Why the place is gone for good (one line, also logged once), or None."""

    async def explain(self, conn: Connection, error: RemoteKernelError) -> RemoteKernelError:
        """A start's failure, or a better one line for it when the place explains it."""

    async def release(self, conn: Connection) -> None:
        """Undo the place (the kernel is stopped or lost): cancel what holds resources."""

    async def stop_kernel(self, conn: Connection, kernel_id: str) -> str:
        """Stop the kernel (given up during an outage, or by `remote_kernel stop`); how it
        ended, in a few words."""


async def agent_for(
    conn: Connection, python: str, spot: Spot, keepalive_interval: float
) -> RemoteAgent:
    """The remote agent that runs the kernels of ``spot`` (one per spot and interpreter on a
    connection, shared by its kernels)."""
    from ..agent import shared_agent

    mode, launcher = spot.agent_mode, spot.launcher
    return await shared_agent(conn, python, spot.label, keepalive_interval, mode, launcher)


STOP_REPLY_SLACK = 10.0  # seconds beyond connect_timeout for the agent's stop (SIGTERM, SIGKILL)


async def stop_through_agent(
    conn: Connection, settings: KernelSettings, spot: Spot, kernel_id: str
) -> str:
    """Ask the spot's agent to stop ``kernel_id``; how it ended, in a few words."""
    agent = await agent_for(conn, settings.python, spot, settings.keepalive_interval)
    timeout = settings.connect_timeout + STOP_REPLY_SLACK
    reply = await agent.request("stop", reply_timeout=timeout, kernel=kernel_id)
    return f"exit status {reply.get('status')}"


def site_for(kernel_id: str, settings: KernelSettings, log: logging.Logger) -> Site:
    """The site of a kernel's settings: a Slurm job when ``slurm`` is set, else the host."""
    if settings.slurm is not None:
        from .slurm import SlurmSite

        return SlurmSite(kernel_id, settings, log)
    from .host import HostSite

    return HostSite(settings)
