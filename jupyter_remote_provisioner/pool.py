"""The process's SSH connections, one per target, shared by its kernels and kept a while.

:data:`POOL` hands every kernel on a target the same :class:`~.ssh.Connection`. When the
last kernel lets go, the connection (and the remote agent on it) is kept for
``connection_persist`` seconds, like OpenSSH's ControlPersist, so that the next kernel on
that target pays no SSH handshake; then it is closed. A kept connection holds the package
loop (:mod:`.loop`, a daemon thread, so it never delays the exit of the process), and
:func:`close_kept_connections`, run at exit, closes it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging

from . import loop
from .ssh import Connection
from .target import Target

log = logging.getLogger(__name__)

EXIT_CLOSE_WAIT = 1.0  # seconds the process exit waits for kept connections to close


class _Abandoned(Exception):
    """The connection attempt that others were waiting for was cancelled by its caller."""


class ConnectionPool:
    """One shared :class:`Connection` per target for the whole process (package loop only),
    kept for its ``persist`` seconds after its last user let go."""

    def __init__(self) -> None:
        self._entries: dict[Target, asyncio.Future[Connection]] = {}
        self._idle: dict[Connection, asyncio.TimerHandle] = {}

    async def acquire(
        self, target: Target, connect_timeout: float, keepalive_interval: float
    ) -> Connection:
        """Return the live connection to ``target``, connecting if there is none."""
        entry = self._entries.get(target)
        if entry is not None and entry.done() and entry.result().lost.is_set():
            lost = entry.result()
            self._drop(lost)
            if lost in self._idle:  # lost while kept: nobody else will close it
                asyncio.ensure_future(self._close_kept(lost))
            entry = None
        if entry is None:
            entry = asyncio.get_running_loop().create_future()
            self._entries[target] = entry
            connection = Connection(target)
            try:
                await connection.open(connect_timeout, keepalive_interval)
            except BaseException as exc:
                del self._entries[target]
                # its caller gave up: the others waiting for it try again themselves
                entry.set_exception(
                    _Abandoned() if isinstance(exc, asyncio.CancelledError) else exc
                )
                entry.exception()  # mark retrieved: concurrent waiters still get it
                raise
            entry.set_result(connection)
        try:
            connection = await asyncio.shield(entry)
        except _Abandoned:
            return await self.acquire(target, connect_timeout, keepalive_interval)
        connection.users += 1
        if self._unkeep(connection):  # a kept connection is in use again
            loop.release()
        return connection

    async def release(self, connection: Connection, persist: float = 0.0) -> None:
        """Drop one user; the last one closes the connection, or keeps it ``persist`` s."""
        connection.users -= 1
        if connection.users > 0:
            return
        if persist > 0 and not connection.lost.is_set() and connection.ssh is not None:
            loop.acquire()  # the kept connection needs the loop running
            self._idle[connection] = asyncio.get_running_loop().call_later(
                persist, lambda: asyncio.ensure_future(self._close_kept(connection))
            )
            log.debug("keeping the SSH connection to %s for %g s", connection.target.describe(),
                      persist)  # fmt: skip
            return
        self._drop(connection)
        await connection.close()

    def _unkeep(self, connection: Connection) -> bool:
        """Stop keeping ``connection``; True if it was kept (its hold on the loop is then
        the caller's to release)."""
        timer = self._idle.pop(connection, None)
        if timer is not None:
            timer.cancel()
        return timer is not None

    def _drop(self, connection: Connection) -> None:
        """Take ``connection`` out of the pool: no new user gets it."""
        entry = self._entries.get(connection.target)
        if entry is not None and entry.done() and entry.result() is connection:
            del self._entries[connection.target]

    async def _close_kept(self, connection: Connection) -> None:
        """Close a kept connection, then let go of the loop it held."""
        if connection.users > 0 or not self._unkeep(connection):
            return
        self._drop(connection)
        try:
            await connection.close()
        finally:
            loop.release()

    def has_idle(self) -> bool:
        """Whether a connection is being kept with no user."""
        return bool(self._idle)

    async def close_idle(self) -> None:
        """Close every kept connection now (at process exit, or in tests)."""
        await asyncio.gather(*(self._close_kept(c) for c in list(self._idle)))


POOL = ConnectionPool()


def close_kept_connections(timeout: float = EXIT_CLOSE_WAIT) -> None:
    """Close the connections kept after their last kernel, waiting at most ``timeout`` s.

    Registered with atexit, so the process exit waits at most a moment; the remote side
    also ends its half when the process is gone and the TCP connection with it.
    """
    if not POOL.has_idle():
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(POOL.close_idle(), loop.get()).result(timeout)


atexit.register(close_kept_connections)
