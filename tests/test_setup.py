"""`.ci/setup`'s apt-get (the README's first command): on a fresh machine another apt or dpkg
(unattended-upgrades) often holds the lock; setup waits for it, bounded, instead of failing."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APT_GET = ["bash", str(ROOT / ".ci" / "apt-get"), "check"]  # `check` takes apt's lock
LOCK = Path("/var/lib/dpkg/lock-frontend")

pytestmark = pytest.mark.timeout(120)


def hold_lock() -> int:
    """Take dpkg's frontend lock the way apt does (fcntl); close the fd to release it."""
    if os.geteuid() != 0:
        pytest.fail("holding dpkg's lock needs root, as .ci/setup does", pytrace=False)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # waits (bounded by the test timeout) for a real apt
    return fd


def test_apt_get_waits_for_the_lock_then_runs() -> None:
    fd = hold_lock()
    try:
        proc = subprocess.Popen(APT_GET, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # still waiting for the lock, not failed
    finally:
        os.close(fd)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_apt_get_gives_up_after_its_bound_in_one_line() -> None:
    fd = hold_lock()
    try:
        env = dict(os.environ, APT_LOCK_WAIT="1")
        result = subprocess.run(APT_GET, env=env, capture_output=True, text=True, timeout=60,
                                check=False)  # fmt: skip
    finally:
        os.close(fd)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "apt-get: another apt or dpkg still holds its lock after 1 s; run this again once it "
        "has finished"
    )
