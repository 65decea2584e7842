"""What a sync must do: compare two listings, decide which files and directories to copy.

A file is unchanged when its size, permissions and modification time agree (to the second),
or, with ``checksum``, when both ends hash it the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .remote import files
from .remote.files import KIND, MODE, MTIME, REL, SIZE
from .sync_channel import SyncChannel, local_failure

Entry = list[Any]


@dataclass(frozen=True)
class SyncOptions:
    """What to skip (rsync-like patterns, plus the defaults), how to compare, whether to copy."""

    exclude: tuple[str, ...] = ()
    default_excludes: bool = True
    checksum: bool = False
    dry_run: bool = False

    def rules(self) -> files.Rules:
        return files.Rules(self.exclude, self.default_excludes)


DEFAULT_OPTIONS = SyncOptions()


@dataclass
class SyncResult:
    """What a sync did (or, on a dry run, would do)."""

    source: str
    dest: str
    copied: list[str] = field(default_factory=list)  # relative paths of the files sent
    bytes: int = 0
    unchanged: int = 0
    dirs: int = 0  # directories created
    skipped: list[str] = field(default_factory=list)  # broken links, special files, loops
    seconds: float = 0.0


def plan(
    source: list[Entry], dest: list[Entry], same_content: set[str] | None
) -> tuple[list[Entry], list[Entry], int]:
    """(directories to create, files to copy, unchanged files) to make dest match source.

    A file is unchanged when its size, permissions and modification time (to the second,
    so file systems of coarser resolution agree) match, or with ``same_content`` (checksum
    mode) when it is listed there.
    """
    existing = {e[REL]: e for e in dest}
    dirs, copies, unchanged = [], [], 0
    for item in source:
        there = existing.get(item[REL])
        if item[KIND] == "d":
            if there is None:
                dirs.append(item)
            continue
        if there is not None and there[KIND] == "f" and _same(item, there, same_content):
            unchanged += 1
        else:
            copies.append(item)
    return dirs, copies, unchanged


def _same(a: Entry, b: Entry, same_content: set[str] | None) -> bool:
    if a[SIZE] != b[SIZE] or a[MODE] != b[MODE]:
        return False
    if same_content is not None:
        return a[REL] in same_content
    return a[MTIME] // 1_000_000_000 == b[MTIME] // 1_000_000_000


def same_size_files(source: list[Entry], dest: list[Entry]) -> list[str]:
    """Files on both sides with equal sizes: the only ones worth a checksum."""
    sizes = {e[REL]: e[SIZE] for e in dest if e[KIND] == "f"}
    return [e[REL] for e in source if e[KIND] == "f" and sizes.get(e[REL]) == e[SIZE]]


def local_hashes(root: str, rels: Iterable[str]) -> list[str]:
    out = []
    for rel in rels:
        path = files.join(root, rel)
        try:
            out.append(files.file_hash(path))
        except OSError as exc:
            raise local_failure("read", exc, path) from None
    return out


def remote_join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if rel else root


async def compare(
    channel: SyncChannel,
    source: list[Entry],
    existing: list[Entry],
    local_root: str,
    remote_root: str,
    checksum: bool,
    skipped: list[str],
) -> tuple[list[Entry], list[Entry], SyncResult]:
    """(directories to create, files to copy, the result so far) for a sync of ``source``
    onto ``existing``; with ``checksum``, both ends hash the files of equal size."""
    same = None
    if checksum:
        candidates = same_size_files(source, existing)
        theirs = await channel.call("hash", paths=[remote_join(remote_root, r) for r in candidates])
        mine = local_hashes(local_root, candidates)
        same = {rel for rel, a, b in zip(candidates, mine, theirs["hashes"]) if a == b}
    dirs, copies, unchanged = plan(source, existing, same)
    result = SyncResult("", "", [e[REL] for e in copies], sum(e[SIZE] for e in copies))
    result.unchanged, result.dirs, result.skipped = unchanged, len(dirs), skipped
    return dirs, copies, result
