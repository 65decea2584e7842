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
from pathlib import PurePath


@dataclass(frozen=True)
class Placement:
    """A notebook directory's remote working directory (None: home); ``mapped``: it comes
    from ``path_map`` (so it is created if missing)."""

    cwd: str | None
    mapped: bool


def _local(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _remote_under(remote_root: str, local: str, local_root: str) -> str:
    """``remote_root`` followed by the path of ``local`` below ``local_root``."""
    parts = PurePath(local).relative_to(local_root).parts
    return posixpath.join(remote_root, *parts) if parts else remote_root


def map_path(local_path: str, path_map: Mapping[str, str]) -> str | None:
    """The remote path of ``local_path`` under the longest matching local root, or None."""
    path = _local(local_path)
    roots = [(_local(local), remote) for local, remote in path_map.items()]
    matching = [(local, remote) for local, remote in roots if PurePath(path).is_relative_to(local)]
    if not matching:
        return None
    local_root, remote_root = max(matching, key=lambda pair: len(pair[0]))
    return _remote_under(remote_root, path, local_root)


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
    base, workdir = _local(local_dir), cwd or "~"
    targets = []
    for entry in uploads:
        local = _local(os.path.join(base, os.path.expanduser(entry)))
        remote = map_path(local, path_map)
        if remote is None and PurePath(local).is_relative_to(base):
            remote = _remote_under(workdir, local, base)
        elif remote is None:
            remote = posixpath.join(workdir, os.path.basename(local))
        targets.append((local, remote))
    return targets
