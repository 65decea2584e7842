"""Signals on both sides of the connection, portable to a Windows or macOS laptop.

The remote host is POSIX (Linux, macOS): the numbers below are its signals, which the remote
agent delivers, whatever this machine is (Windows' ``signal`` module has no SIGKILL or
SIGHUP, so reading them from it would fail at import time there).

A foreground command (``launch``, ``attach``) learns that it must interrupt or stop the way
a local kernel would on this machine: POSIX signals here; on Windows Ctrl-C and Ctrl-Break,
plus the interrupt event and parent handle that jupyter_client and VS Code give a kernel
process (``JPY_INTERRUPT_EVENT`` and ``JPY_PARENT_PID``, as ``jupyter_client.win_interrupt``
and ipykernel's ``ParentPollerWindows`` use them). jupyter_client and VS Code end a kernel
process on Windows with ``TerminateProcess``, which no process can intercept: the remote host
then stops the kernel once its client is gone for ``orphan_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGHUP, SIGINT, SIGKILL, SIGTERM = 1, 2, 9, 15  # fixed by POSIX, the same on Linux and macOS
NAMES = {SIGHUP: "SIGHUP", SIGINT: "SIGINT", SIGKILL: "SIGKILL", SIGTERM: "SIGTERM"}
WATCH_INTERVAL_MS = 200  # how often the Windows handle watcher checks that it should end

Handler = Callable[[], object]


def remote_name(signum: int) -> str:
    """``SIGTERM`` for 15, as the remote host names it."""
    return NAMES.get(signum, f"signal {signum}")


@contextlib.contextmanager
def foreground_signals(stop: Handler, interrupt: Handler | None = None) -> Iterator[None]:
    """Within the block, call ``interrupt()`` on Ctrl-C (``stop()`` when it is None) and
    ``stop()`` when this process is told to end; both run on the running event loop."""
    here = asyncio.get_running_loop()
    if sys.platform == "win32":
        with _windows_signals(here, stop, interrupt):
            yield
        return
    handlers = {signal.SIGINT: interrupt or stop, signal.SIGTERM: stop, signal.SIGHUP: stop}
    for signum, handler in handlers.items():
        here.add_signal_handler(signum, handler)
    try:
        yield
    finally:
        for signum in handlers:
            here.remove_signal_handler(signum)


def _handle(name: str) -> int:
    """The Windows handle jupyter_client passes in environment variable ``name`` (0: none)."""
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


if sys.platform == "win32":
    import _winapi
    import ctypes

    @contextlib.contextmanager
    def _windows_signals(
        here: asyncio.AbstractEventLoop, stop: Handler, interrupt: Handler | None
    ) -> Iterator[None]:
        """Ctrl-C, Ctrl-Break and jupyter_client's handles (asyncio has no signal handlers
        on Windows: ``signal.signal`` handlers hand over to the loop)."""

        def on_loop(handler: Handler) -> Callable[..., object]:
            return lambda *_: here.call_soon_threadsafe(handler)

        wanted = {signal.SIGINT: interrupt or stop, signal.SIGBREAK: stop}
        previous = {signum: signal.signal(signum, on_loop(h)) for signum, h in wanted.items()}
        done = threading.Event()
        watcher = threading.Thread(
            target=_watch_handles, args=(here, stop, interrupt, done), daemon=True
        )
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join(1.0)
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _watch_handles(
        here: asyncio.AbstractEventLoop,
        stop: Handler,
        interrupt: Handler | None,
        done: threading.Event,
    ) -> None:
        """Wait on the interrupt event (-> ``interrupt``) and the parent process (-> ``stop``)
        until ``done``; the wait is bounded so that ``done`` is seen."""
        event = _handle("JPY_INTERRUPT_EVENT") if interrupt is not None else 0
        parent = _handle("JPY_PARENT_PID")  # on Windows a process handle, not a pid
        handles = [h for h in (event, parent) if h]
        while handles and not done.is_set():
            try:
                result = _winapi.WaitForMultipleObjects(handles, False, WATCH_INTERVAL_MS)
            except OSError:
                return  # a handle we were not really given: nothing to watch
            if result == _winapi.WAIT_TIMEOUT or not 0 <= result < len(handles):
                continue
            handle = handles[result]
            if handle == event and interrupt is not None:
                ctypes.windll.kernel32.ResetEvent(handle)
                here.call_soon_threadsafe(interrupt)
            else:  # the parent process ended: stop, as ipykernel does
                here.call_soon_threadsafe(stop)
                return
