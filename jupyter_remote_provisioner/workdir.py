"""Where a notebook's kernel works remotely, and where its pre-launch uploads go.

``path_map`` maps local directories to remote ones (``{"~/work/proj": "~/projects/proj"}``):
a notebook anywhere under a local root gets the matching remote directory as its kernel's
working directory, so relative paths mean the same on both sides. Notebooks outside every
root use ``cwd`` (default: the remote home). Remote paths are relative to the remote home.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """A notebook directory's remote working directory (None: home); ``mapped``: it comes
    from ``path_map`` (so it is created if missing)."""

    cwd: str | None
    mapped: bool


def _local(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def map_path(local_path: str, path_map: Mapping[str, str]) -> str | None:
    """The remote path of ``local_path`` under the longest matching local root, or None."""
    path = _local(local_path)
    best: tuple[str, str] | None = None
    for local_root, remote_root in path_map.items():
        root = _local(local_root)
        if (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and (
            best is None or len(root) > len(best[0])
        ):
            best = (root, remote_root)
    if best is None:
        return None
    relative = os.path.relpath(path, best[0])
    if relative == ".":
        return best[1]
    return posixpath.join(best[1], *relative.split(os.sep))


def placement(local_dir: str, path_map: Mapping[str, str], cwd: str | None) -> Placement:
    """The remote working directory of a kernel started for a notebook in ``local_dir``."""
    mapped = map_path(local_dir, path_map)
    return Placement(mapped, True) if mapped is not None else Placement(cwd, False)


def upload_targets(
    uploads: Sequence[str], local_dir: str, path_map: Mapping[str, str], cwd: str | None
) -> list[tuple[str, str]]:
    """(local path, remote path) of each ``upload`` entry, relative ones taken from the
    notebook's directory. A path under a mapped root goes to its mapped place; one under the
    notebook's directory keeps its relative place under the kernel's working directory;
    any other goes into the working directory by its name."""
    base = _local(local_dir)
    targets = []
    for entry in uploads:
        local = _local(os.path.join(base, os.path.expanduser(entry)))
        remote = map_path(local, path_map)
        if remote is None and local == base:
            remote = cwd or "~"
        elif remote is None:
            inside = local.startswith(base.rstrip(os.sep) + os.sep)
            relative = os.path.relpath(local, base) if inside else os.path.basename(local)
            remote = posixpath.join(cwd or "", *relative.split(os.sep))
        targets.append((local, remote))
    return targets
