"""The sync helper's channel: start it, send requests, read replies, report failures.

The helper (``remote/sync.py``) runs on the kernel's remote interpreter over one exec channel
of an existing SSH connection, so files take the same jump chain as the kernel. A failure on
either end becomes a one-line :class:`SyncError` that says what failed, where, and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from typing import Any

import asyncssh

from .agent import bootstrap_input, remote_command, start_failure
from .errors import RemoteKernelError
from .target import Hop

HELLO_TIMEOUT = 30.0  # seconds for the remote interpreter to start the helper
CLOSE_TIMEOUT = 10.0


class SyncError(RemoteKernelError):
    """A sync failed; the message says what and where, and what to do."""


def describe_failure(action: str, place: str, code: str, reason: str) -> str:
    """A one-line message for an OS error (errno name ``code``) while doing ``action``."""
    if code in ("ENOSPC", "EDQUOT"):
        what = "no space left" if code == "ENOSPC" else "disk quota exceeded"
        return f"cannot {action} {place}: {what}; free space there or choose another directory"
    if code == "EROFS":
        return f"cannot {action} {place}: read-only file system; choose a writable directory"
    if code in ("EACCES", "EPERM"):
        return (
            f"cannot {action} {place}: {reason.lower()}; choose a path you may "
            f"{'read' if action == 'read' else 'write'}, or fix its permissions"
        )
    if code == "ENOENT" and action == "read":
        return f"{place} does not exist (it may have been removed during the sync)"
    if code == "ENOTDIR":
        return f"cannot {action} {place}: part of the path is a file, not a directory"
    if code == "EISDIR":
        return f"cannot {action} {place}: a directory is in the way"
    return f"cannot {action} {place}: {reason}"


def local_failure(action: str, exc: OSError, path: str) -> SyncError:
    code = errno.errorcode.get(exc.errno or 0, "")
    return SyncError(describe_failure(action, path, code, exc.strerror or ""))


class SyncChannel:
    """The sync helper running on the remote host, over one exec channel."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], host: Hop) -> None:
        self.process = process
        self.host = host
        self._ids = 0

    @classmethod
    async def open(cls, conn: asyncssh.SSHClientConnection, python: str, host: Hop) -> SyncChannel:
        """Start the helper with ``python`` on ``conn`` (to ``host``); wait for its hello."""
        process = await conn.create_process(remote_command(python, "sync"), encoding=None)
        channel = cls(process, host)
        with contextlib.suppress(BrokenPipeError, asyncssh.Error):  # ended at once: see below
            process.stdin.write(bootstrap_input())
        try:
            hello = await asyncio.wait_for(process.stdout.readline(), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            hello = b""
        if not hello.startswith(b'{"event":"hello"'):
            process.close()
            stderr = ""
            try:
                await asyncio.wait_for(process.wait_closed(), CLOSE_TIMEOUT)
                stderr = (await process.stderr.read()).decode(errors="replace")
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                pass
            raise start_failure(python, host.label, process.exit_status, stderr)
        return channel

    def place(self, path: str) -> str:
        """``host:path``, as scp writes it."""
        return f"{self.host.alias}:{path}"

    def send(self, op: str, **fields: Any) -> int:
        """Write one request; return its id. If the channel is closing, the next
        :meth:`reply` reports why."""
        self._ids += 1
        line = json.dumps({"id": self._ids, "op": op, **fields}, separators=(",", ":"))
        with contextlib.suppress(BrokenPipeError, asyncssh.Error):
            self.process.stdin.write(line.encode() + b"\n")
        return self._ids

    async def reply(self) -> dict[str, Any]:
        """The next reply; a failure reported by the helper becomes a SyncError."""
        try:
            line = await self.process.stdout.readline()
        except (asyncssh.Error, OSError):
            line = b""
        if not line:
            raise SyncError(
                f"lost the connection to {self.host.label} during the sync; check the link "
                f"and run it again (files already copied are complete)"
            )
        message: dict[str, Any] = json.loads(line)
        if message.get("ok") is False:
            raise SyncError(
                describe_failure(
                    message.get("action", "write"),
                    self.place(message.get("path", "")),
                    message.get("errno", ""),
                    message.get("error", ""),
                )
            )
        return message

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return await self.reply()

    async def read_data(self, size: int) -> bytes:
        data = await self.process.stdout.read(size)
        if not data:
            await self.reply()  # raises: the channel closed
        return data

    async def close(self) -> None:
        """End the helper (EOF on its stdin) and wait, bounded, for the channel to close."""
        try:
            self.process.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass
        try:
            await asyncio.wait_for(self.process.wait_closed(), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError):
            self.process.close()

    async def abort(self) -> None:
        """Stop the helper mid-upload: at EOF it removes the file it was writing and exits;
        wait (bounded) for that, then cut the channel."""
        await self.close()
        self.process.close()

    def cut(self) -> None:
        """Close the channel at once (mid-download: the helper is blocked writing to us)."""
        self.process.close()
