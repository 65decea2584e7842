"""Stopping a kernel that was given up during an outage (shut down while its host could not
be reached) as soon as the host answers again, so that it does not hold memory and GPUs
until its orphan_timeout. Runs on the package loop, bounded by reconnect_timeout; if this
process ends first, the host's orphan rule still stops the kernel."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from . import loop
from .agent import AgentError, AgentLost
from .errors import RemoteKernelError
from .kernel_settings import KernelSettings
from .pool import POOL

if TYPE_CHECKING:
    from .sites import Site

EXIT_WAIT = 2.0  # seconds the process exit waits for stops under way
PAUSES = (0.5, 5.0)  # seconds between attempts: first, then doubling up to the second
_PENDING: set[asyncio.Task[None]] = set()  # strong references while they run


def stop_when_reachable(
    site: Site, settings: KernelSettings, kernel_id: str, log: logging.Logger
) -> asyncio.Task[None]:
    """Start trying to stop ``kernel_id`` where ``site`` runs it; returns the task (cancel
    it to give up). The task holds the package loop while it runs."""
    loop.acquire()
    task = asyncio.ensure_future(_stop_later(site, settings, kernel_id, log))
    _PENDING.add(task)
    task.add_done_callback(_done)
    return task


def _done(task: asyncio.Task[None]) -> None:
    _PENDING.discard(task)
    loop.release()


async def _stop_later(
    site: Site, settings: KernelSettings, kernel_id: str, log: logging.Logger
) -> None:
    where = settings.target.describe()
    deadline = time.monotonic() + settings.reconnect_timeout
    pause = PAUSES[0]
    while True:
        try:  # at once first: often only the agent's channel was lost, not the host
            await asyncio.wait_for(_stop(site, settings, kernel_id), settings.connect_timeout * 2)
        except AgentError:
            return  # not there any more: nothing to stop
        except (RemoteKernelError, AgentLost, asyncio.TimeoutError, OSError) as exc:
            log.debug("stopping kernel %s on %s later: %s", kernel_id, where, exc)
        else:
            log.info("Stopped remote kernel %s on %s, reachable again", kernel_id, where)
            return
        if time.monotonic() + pause >= deadline:
            return
        await asyncio.sleep(pause)
        pause = min(2 * pause, PAUSES[1])


async def _stop(site: Site, settings: KernelSettings, kernel_id: str) -> None:
    conn = await POOL.acquire(
        settings.target, settings.connect_timeout, settings.keepalive_interval
    )
    try:
        await site.stop_kernel(conn, kernel_id)
    finally:
        await POOL.release(conn, settings.connection_persist)


def finish_late_stops(timeout: float = EXIT_WAIT) -> None:
    """At process exit, give the stops under way up to ``timeout`` seconds to finish (the
    host may be reachable right away); the remote orphan rule covers the rest."""
    if not _PENDING:
        return
    with contextlib.suppress(Exception):
        pending = list(_PENDING)
        asyncio.run_coroutine_threadsafe(asyncio.wait(pending), loop.get()).result(timeout)


atexit.register(finish_late_stops)
