"""``sync``: copy files to (or with ``--pull``, from) the host of a remote kernelspec.

It connects through the kernelspec's jump chain, starts the sync helper on the kernelspec's
interpreter and copies what changed (see :mod:`.transfer`). On a terminal it draws a progress
bar on stderr; it always ends with a one-line summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from typing import Any, TextIO

from .kernel_settings import KernelSettings
from .kernelspec import find_spec
from .provisioner import settings_from_config
from .remote.files import DEFAULT_EXCLUDES
from .ssh import private_connection
from .sync_channel import SyncChannel
from .sync_plan import SyncOptions, SyncResult
from .target import Hop
from .transfer import pull, push

REDRAW_INTERVAL = 0.1  # seconds between progress bar redraws


def register(subparsers: Any) -> None:
    sync = subparsers.add_parser(
        "sync",
        help="copy files to (or --pull from) the host of a remote kernelspec",
        description="Copy a file or directory to the host of kernelspec NAME, through its jump "
        "hosts: `sync NAME LOCAL REMOTE`, or back with `sync NAME REMOTE LOCAL --pull`. Only "
        "files whose size or modification time differ are copied; permissions and times are "
        "kept; nothing is deleted. A directory's contents go into the destination directory "
        "(created if missing); a file goes into a destination that is a directory or ends with "
        "'/'. Remote paths are relative to the remote home directory; a leading 'HOST:' naming "
        "the kernelspec's host is accepted, as scp writes it.",
    )
    sync.add_argument("name", help="a kernelspec's slug or display name")
    sync.add_argument("source", help="LOCAL (or REMOTE with --pull)")
    sync.add_argument("dest", help="REMOTE (or LOCAL with --pull)")
    sync.add_argument("--pull", action="store_true", help="copy from the remote host")
    sync.add_argument(
        "--checksum",
        action="store_true",
        help="compare file contents (SHA-256) instead of size and modification time",
    )
    sync.add_argument(
        "-n", "--dry-run", action="store_true", help="list what would be copied; copy nothing"
    )
    sync.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="skip matching files and directories (repeatable): a name pattern like '*.ckpt' "
        "matches at any depth, 'data/raw' matches that path, '/out' only at the top",
    )
    sync.add_argument(
        "--no-default-excludes",
        dest="default_excludes",
        action="store_false",
        help=f"also copy {', '.join(DEFAULT_EXCLUDES)} and virtual environments "
        "(skipped by default)",
    )
    sync.set_defaults(run=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    spec = find_spec(args.name)
    settings = settings_from_config(spec.config)
    options = SyncOptions(tuple(args.exclude), args.default_excludes, args.checksum, args.dry_run)
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.dry_run else None
    source, dest = args.source, args.dest
    if args.pull:
        source = without_host(source, settings.target.host)
    else:
        dest = without_host(dest, settings.target.host)
    try:
        result = asyncio.run(_sync(settings, source, dest, args.pull, options, bar))
    finally:
        if bar is not None:
            bar.clear()
    if args.dry_run:
        for path in result.copied:
            print(path or result.source.rsplit("/", 1)[-1])
    if result.skipped:
        shown = ", ".join(result.skipped[:5]) + (", ..." if len(result.skipped) > 5 else "")
        print(
            f"skipped {len(result.skipped)} that are not regular files or directories (broken "
            f"links, sockets, loops): {shown}",
            file=sys.stderr,
        )
    print(summary(result, args.dry_run))
    return 0


def without_host(path: str, host: Hop) -> str:
    """REMOTE without a leading ``host:`` that names the kernelspec's host, as scp users
    write it (``gpu:~/proj``); any other colon is part of the path."""
    prefix, colon, rest = path.partition(":")
    names = {host.alias, host.hostname}
    names |= {f"{host.user}@{name}" for name in names}
    return rest if colon and prefix in names else path


async def _sync(
    settings: KernelSettings,
    source: str,
    dest: str,
    pull_from_remote: bool,
    options: SyncOptions,
    progress: ProgressBar | None,
) -> SyncResult:
    target = settings.target
    async with private_connection(
        target, settings.connect_timeout, settings.keepalive_interval
    ) as conn:
        assert conn.ssh is not None
        channel = await SyncChannel.open(conn.ssh, settings.python, target.host)
        try:
            if pull_from_remote:
                return await pull(channel, source, dest, options, progress)
            return await push(channel, source, dest, options, progress)
        finally:
            await channel.close()


def human_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def summary(result: SyncResult, dry_run: bool = False) -> str:
    """The one-line report of a sync."""
    unchanged = f"; {result.unchanged} unchanged" if result.unchanged else ""
    size = human_bytes(result.bytes)
    if dry_run:
        return (
            f"dry run: would copy {_files(len(result.copied))} ({size}) to {result.dest}{unchanged}"
        )
    if not result.copied and not result.dirs:
        return f"{result.dest} is up to date: {_files(result.unchanged)} unchanged"
    rate = human_bytes(result.bytes / result.seconds) if result.seconds > 0 else "-"
    return (
        f"copied {_files(len(result.copied))} ({size}) to {result.dest} in "
        f"{result.seconds:.2f} s ({rate}/s){unchanged}"
    )


class ProgressBar:
    """A one-line progress bar (bytes, rate, files), redrawn at most every 0.1 s."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def __call__(self, done: int, total: int, files_done: int, files_total: int) -> None:
        now = time.monotonic()
        if now - self._drawn < REDRAW_INTERVAL and files_done < files_total:
            return
        self._drawn = now
        fraction = done / total if total else 1.0
        rate = human_bytes(done / max(now - self.started, 1e-6))
        text = (
            f" {human_bytes(done)} / {human_bytes(total)}  {rate}/s  "
            f"{files_done}/{_files(files_total)}"
        )
        columns = shutil.get_terminal_size((80, 20)).columns
        width = max(10, min(40, columns - len(text) - 8))
        filled = int(width * fraction)
        line = f"{fraction:4.0%} [{'#' * filled}{'.' * (width - filled)}]{text}"[: columns - 1]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))

    def clear(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
