"""Copying files to and from the remote host: push and pull over a :class:`SyncChannel`.

Both ends list their side with the same rules (``remote/files.py``); only what
:mod:`.sync_plan` finds changed is sent. Requests are pipelined, so a tree of small files
costs no round trip per file. Every file is written under a temporary name and renamed into
place when complete; the first failure stops the sync with a one-line SyncError.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from .remote import files
from .remote.files import MODE, MTIME, REL, SIZE
from .sync_channel import SyncChannel, SyncError, local_failure
from .sync_plan import DEFAULT_OPTIONS, Entry, SyncOptions, SyncResult, compare, remote_join

SEND_CHUNK = 256 * 1024
# Flow control: the helper reports what it has written at least every CHECKPOINT bytes (a
# flushed reply to a request without "more", or a "got" note inside a large file), and the
# sender waits while AHEAD bytes are unreported. Without it a whole SSH window (2 MiB) piles
# up in sshd's buffers whenever the helper is slower than the link (a slow disk, many small
# files), and the transfer stalls on window adjusts: 0.9 s instead of 0.2 s for 2,000 files
# of 4 KiB here.
CHECKPOINT = 256 * 1024
AHEAD = 3 * CHECKPOINT  # > 2 CHECKPOINTs, the widest gap between reports: no deadlock

# progress(bytes done, bytes total, files done, files total)
Progress = Callable[[int, int, int, int], None]


def _local_scan(root: str, rules: files.Rules, recursive: bool = True) -> tuple[Any, Any]:
    try:
        return files.scan(root, rules, recursive)
    except OSError as exc:
        raise local_failure("read", exc, exc.filename or root) from None


async def _remote_scan(
    channel: SyncChannel, path: str, options: SyncOptions, recursive: bool = True
) -> dict[str, Any]:
    """The helper's listing of ``path`` (entries, skipped), with the same rules as ours."""
    return await channel.call(
        "scan", path=path, recursive=recursive, exclude=list(options.exclude),
        defaults=options.default_excludes,
    )  # fmt: skip


async def push(
    channel: SyncChannel,
    local: str,
    remote: str,
    options: SyncOptions = DEFAULT_OPTIONS,
    progress: Progress | None = None,
) -> SyncResult:
    """Make ``remote`` a copy of the local file or directory ``local``.

    A directory's contents go into ``remote`` (created if missing). A file becomes
    ``remote``, or goes inside it when ``remote`` is a directory or ends with "/".
    """
    started = time.monotonic()
    src = os.path.abspath(os.path.expanduser(local))
    src_kind = files.kind_of(src)
    if src_kind == "missing":
        raise SyncError(f"local path {local} does not exist; check the path")
    if src_kind == "other":
        raise SyncError(f"local path {local} is not a file or a directory")
    dest = await channel.call("stat", path=remote)
    if src_kind == "file" and (dest["kind"] == "dir" or remote.endswith("/")):
        dest = await channel.call("stat", path=remote_join(dest["path"], os.path.basename(src)))
    if src_kind == "dir" and dest["kind"] in ("file", "other"):
        raise SyncError(f"{channel.place(dest['path'])} is a file; give a directory to sync into")
    root = dest["path"]
    source, skipped = _local_scan(src, options.rules())
    existing: list[Entry] = []
    if dest["kind"] != "missing":
        recursive = src_kind == "dir" and dest["kind"] == "dir"
        existing = (await _remote_scan(channel, root, options, recursive))["entries"]
    dirs, copies, result = await compare(
        channel, source, existing, src, root, options.checksum, skipped
    )
    result.source, result.dest = src, channel.place(root)
    if not options.dry_run and (dirs or copies):
        await _send(channel, src, root, dirs, copies, result.bytes, progress)
    result.seconds = time.monotonic() - started
    return result


class Written:
    """How far the helper has written the data sent, from its replies and its "got" notes;
    the sender waits on it, so the data in flight stays below AHEAD bytes. The sender is
    woken once per flushed reply or note, not per file (that costs 45 us a file)."""

    def __init__(self) -> None:
        self.bytes = 0  # data bytes the helper has written
        self.answered = 0  # requests answered
        # request id -> (first data byte, end, whether the helper flushes its reply)
        self._spans: dict[int, tuple[int, int, bool]] = {}
        self._changed = asyncio.Event()

    def sent(self, request_id: int, start: int, size: int, flushed: bool) -> None:
        self._spans[request_id] = (start, start + size, flushed)

    def note(self, message: dict[str, Any]) -> None:
        if "got" in message:  # progress inside a large file
            start = self._spans[message["re"]][0]
            self.bytes = max(self.bytes, start + message["got"])
            self._changed.set()
            return
        _, end, flushed = self._spans.pop(message["re"])
        self.answered += 1
        self.bytes = max(self.bytes, end)
        if flushed:
            self._changed.set()

    async def wait_until_within(self, sent: int, ahead: int) -> None:
        while sent - self.bytes >= ahead:
            self._changed.clear()
            await self._changed.wait()


async def _send(
    channel: SyncChannel,
    src: str,
    root: str,
    dirs: list[Entry],
    copies: list[Entry],
    total: int,
    progress: Progress | None,
) -> None:
    """Stream mkdir and put requests while reading their replies; stop at the first failure
    on either side (the helper then removes the file it was writing)."""
    stdin = channel.process.stdin
    written = Written()
    done = 0

    async def sender() -> None:
        nonlocal done
        for index, item in enumerate(dirs, 1):
            more = bool(copies) or index < len(dirs)
            mkdir = channel.send("mkdir", path=remote_join(root, item[REL]), mode=item[MODE],
                                 more=more)  # fmt: skip
            written.sent(mkdir, done, 0, not more)
        unflushed = 0
        for number, item in enumerate(copies):
            unflushed += item[SIZE] + 1
            more = unflushed < CHECKPOINT and number + 1 < len(copies)
            unflushed = unflushed if more else 0
            path = files.join(src, item[REL])
            try:
                f = open(path, "rb")  # noqa: SIM115, ASYNC230 - local disk; with below
            except OSError as exc:
                raise local_failure("read", exc, path) from None
            with f:
                remaining = item[SIZE]
                put = channel.send(
                    "put", path=remote_join(root, item[REL]), size=remaining,
                    mode=item[MODE], mtime_ns=item[MTIME], more=more, ack_every=CHECKPOINT,
                )  # fmt: skip
                written.sent(put, done, remaining, not more)
                while remaining:
                    await written.wait_until_within(done, AHEAD)
                    try:
                        data = f.read(min(SEND_CHUNK, remaining))
                    except OSError as exc:
                        raise local_failure("read", exc, path) from None
                    if not data:
                        raise SyncError(f"{path} shrank while being sent; run the sync again")
                    stdin.write(data)
                    remaining -= len(data)
                    done += len(data)
                    await stdin.drain()
                    if progress:
                        progress(done, total, number, len(copies))
        await stdin.drain()

    task = asyncio.ensure_future(sender())
    reply: asyncio.Future[dict[str, Any]] | None = None
    finished = False
    try:
        while written.answered < len(dirs) + len(copies):
            reply = asyncio.ensure_future(channel.reply())
            await asyncio.wait([task, reply], return_when=asyncio.FIRST_COMPLETED)
            if task.done() and not task.cancelled() and isinstance(task.exception(), SyncError):
                reply.cancel()
                task.result()  # a local failure
            written.note(await reply)  # a remote failure, or the lost channel, raises here
            if progress and written.answered > len(dirs):
                progress(done, total, written.answered - len(dirs), len(copies))
        await task
        finished = True
    finally:
        if not finished:
            for pending in (task, reply):
                if pending is not None and not pending.done():
                    pending.cancel()
                elif pending is not None and not pending.cancelled():
                    pending.exception()  # retrieved: the failure reported is the helper's
            await channel.abort()


async def pull(
    channel: SyncChannel,
    remote: str,
    local: str,
    options: SyncOptions = DEFAULT_OPTIONS,
    progress: Progress | None = None,
) -> SyncResult:
    """Make ``local`` a copy of the remote file or directory ``remote`` (rules as push)."""
    started = time.monotonic()
    src = await channel.call("stat", path=remote)
    if src["kind"] == "missing":
        raise SyncError(
            f"{channel.place(src['path'])} does not exist; check the path (relative paths "
            f"start in the remote home directory)"
        )
    if src["kind"] == "other":
        raise SyncError(f"{channel.place(src['path'])} is not a file or a directory")
    dest = os.path.abspath(os.path.expanduser(local))
    if src["kind"] == "file" and (files.kind_of(dest) == "dir" or local.endswith("/")):
        dest = os.path.join(dest, src["path"].rstrip("/").rsplit("/", 1)[-1])
    dest_kind = files.kind_of(dest)
    if src["kind"] == "dir" and dest_kind in ("file", "other"):
        raise SyncError(f"local path {dest} is a file; give a directory to sync into")
    listing = await _remote_scan(channel, src["path"], options)
    source: list[Entry] = listing["entries"]
    existing: list[Entry] = []
    if dest_kind != "missing":
        recursive = src["kind"] == "dir" and dest_kind == "dir"
        existing = _local_scan(dest, options.rules(), recursive)[0]
    dirs, copies, result = await compare(
        channel, source, existing, dest, src["path"], options.checksum, listing["skipped"]
    )
    result.source, result.dest = channel.place(src["path"]), dest
    if not options.dry_run and (dirs or copies):
        await _receive(channel, src["path"], dest, dirs, copies, result.bytes, progress)
    result.seconds = time.monotonic() - started
    return result


async def _receive(
    channel: SyncChannel,
    root: str,
    dest: str,
    dirs: list[Entry],
    copies: list[Entry],
    total: int,
    progress: Progress | None,
) -> None:
    """Create the directories, ask for every file at once, write each as it arrives."""
    for item in dirs:
        path = files.join(dest, item[REL])
        try:
            files.make_dir(path, item[MODE])
        except OSError as exc:
            raise local_failure("create directory", exc, path) from None
    for number, item in enumerate(copies, 1):
        channel.send("get", path=remote_join(root, item[REL]), more=number < len(copies))
    done = 0
    for number, item in enumerate(copies, 1):
        header = await channel.reply()
        path = files.join(dest, item[REL])
        try:
            incoming = files.Incoming(path, header["mode"], header["mtime_ns"])
        except OSError as exc:
            channel.cut()
            raise local_failure("write", exc, path) from None
        try:
            remaining = header["size"]
            while remaining:
                data = await channel.read_data(min(files.CHUNK, remaining))
                incoming.write(data)
                remaining -= len(data)
                done += len(data)
                if progress:
                    progress(done, total, number - 1, len(copies))
            await channel.reply()  # the helper read the whole file without error
            incoming.commit()
        except BaseException as exc:
            incoming.abort()
            channel.cut()
            if isinstance(exc, OSError):
                raise local_failure("write", exc, path) from None
            raise
        if progress:
            progress(done, total, number, len(copies))
