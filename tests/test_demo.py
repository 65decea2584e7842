"""`remote_kernel demo`: the README's main job, on a fresh machine with nothing set up."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jupyter_remote_provisioner.demohost import MARKER_VAR

from kernels import wait_for

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "jupyter_remote_provisioner.cli"]
KERNEL_BASE = Path(tempfile.gettempdir()) / f"jupyter-remote-{os.getuid()}"


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, timeout=90,
                          env=env, check=False)  # fmt: skip


def demo_processes() -> list[int]:
    """Processes started by any demo host (they carry its marker variable)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{MARKER_VAR}=".encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def kernel_dirs() -> set[str]:
    return set(os.listdir(KERNEL_BASE)) if KERNEL_BASE.exists() else set()


@pytest.mark.parametrize("backend", ["openssh", "asyncssh"])
def test_demo_runs_a_cell_and_leaves_nothing(backend, no_leftovers):
    before = kernel_dirs()
    result = demo("--backend", backend)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    port = int(re.search(r"on 127\.0\.0\.1:(\d+)", out).group(1))
    assert "Hello from" in out
    assert "SSH_CONNECTION = 127.0.0.1 " in out and out.count(f" 127.0.0.1 {port}") == 1
    assert re.search(r"\[\s*\d+\.\d\d s\] started the kernel through the provisioner", out)
    assert out.rstrip().endswith("nothing is left behind.")
    spec_dir = re.search(r"\| (/\S+/kernels/demo_remote)", out).group(1)
    assert not Path(spec_dir).exists()
    assert demo_processes() == []
    assert kernel_dirs() <= before


def test_demo_keep_then_remove_as_told(tmp_path, no_leftovers):
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_PATH="")
    result = demo("--keep", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "jupyter lab" in out
    listed = subprocess.run([*CLI, "list"], capture_output=True, text=True, env=env, timeout=30,
                            check=True).stdout  # fmt: skip
    assert "slug: remote_demo" in listed
    check = subprocess.run([*CLI, "check", "remote_demo"], capture_output=True, text=True,
                           env=env, timeout=60, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout
    remove = re.search(r"Remove it all with: (.+)", out).group(1)
    remove = remove.replace("remote_kernel ", shlex.join(CLI) + " ", 1)
    subprocess.run(["sh", "-c", remove], env=env, timeout=30, check=True)
    listed = subprocess.run([*CLI, "list"], capture_output=True, text=True, env=env, timeout=30,
                            check=True).stdout  # fmt: skip
    assert "remote_demo" not in listed
    wait_for(lambda: not demo_processes(), 10, "the kept demo host to stop")
