"""The laptop side is portable by construction: mypy checks it as Windows and macOS see it.

The tests run on Linux only; these machines have neither Windows nor macOS, so for those the
type check is the evidence (a POSIX-only call unguarded by ``sys.platform`` fails it). The
remote side (``jupyter_remote_provisioner/remote/``) runs on the POSIX host and is left out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("platform", ["win32", "darwin", "linux"])
def test_local_side_type_checks_on(platform: str) -> None:
    argv = [sys.executable, "-m", "mypy", "--platform", platform, "--exclude", "/remote/",
            "--cache-dir", str(ROOT / ".mypy_cache" / f"platform-{platform}"),
            "jupyter_remote_provisioner"]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280,
                            check=False)  # fmt: skip
    assert result.returncode == 0, f"mypy --platform {platform}:\n{result.stdout}{result.stderr}"
