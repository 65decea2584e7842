"""Small disks for the tests: a tmpfs mounted for a while, and filling one up."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kernels import wait_for


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs on path (``mount -o options``), unmount it afterwards (bounded wait, as
    the processes that used it may take a moment to go)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        wait_for(
            lambda: subprocess.run(["umount", str(path)], check=False).returncode == 0,
            10,
            f"the unmount of {path}",
        )


def fill(path: Path) -> Path:
    """Write zeros into a file in path until its file system is full; returns the file."""
    filler = path / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler
