"""The package's own event-loop thread.

SSH traffic (keepalives, forwarded channels, agent events) must keep flowing whatever the
caller's loop is doing: the blocking ``KernelManager`` runs each coroutine on a loop that
then sits idle until the next call. So every asyncssh object lives on one private loop,
running in a daemon thread, and callers reach it through :func:`call`.

The thread exists only while something uses it: :func:`acquire` starts it and the matching
:func:`release` stops it once the last user is gone, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_users = 0

THREAD_NAME = "jupyter-remote-provisioner-loop"
CANCEL_GRACE = 10.0


def acquire() -> asyncio.AbstractEventLoop:
    """Register one user of the loop, starting its thread if needed."""
    global _loop, _thread, _users
    with _lock:
        _users += 1
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=_run, args=(loop, ready), name=THREAD_NAME, daemon=True
            )
            thread.start()
            ready.wait(timeout=10)
            _loop, _thread = loop, thread
        return _loop


def release() -> None:
    """Unregister one user; the last one stops the loop and joins its thread."""
    global _loop, _thread, _users
    with _lock:
        _users -= 1
        if _users > 0 or _loop is None:
            return
        loop, thread = _loop, _thread
        _loop, _thread = None, None
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=10)


def get() -> asyncio.AbstractEventLoop:
    """The running package loop (``acquire`` must have been called)."""
    if _loop is None:
        raise RuntimeError("the jupyter-remote-provisioner loop is not running")
    return _loop


async def call(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the package loop from any other loop (or from the package loop).

    If the caller is cancelled, ``coro`` is cancelled too and given up to ``CANCEL_GRACE``
    seconds to finish its cleanup before the cancellation reaches the caller.
    """
    loop = get()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return await coro
    ended: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def run() -> T:
        try:
            return await coro
        finally:
            ended.set_result(None)

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        await asyncio.wait([asyncio.wrap_future(ended)], timeout=CANCEL_GRACE)
        raise


def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        _drain(loop)
        loop.close()


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending so the loop closes without warnings."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
