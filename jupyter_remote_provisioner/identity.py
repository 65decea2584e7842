"""Who "the same local user" is, for reclaiming a kept kernel: a random id made once per
local user (a 0600 file in Jupyter's data dir), so that two laptops sharing a remote
account, or two local users of one machine, never reclaim each other's kernels."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir


def local_identity() -> str:
    """This local user's id (made on first use)."""
    path = Path(jupyter_data_dir()) / "remote-provisioner" / "client-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = secrets.token_hex(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by another process: theirs stands
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(ident + "\n")
    return ident
