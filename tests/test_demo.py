"""`remote_kernel demo`: the README's main job, on a fresh machine with nothing set up."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from jupyter_remote_provisioner.demohost import MARKER_VAR, free_port, kill_pids, pid_alive

from kernels import wait_for

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "jupyter_remote_provisioner.cli"]
TOKEN = "demo-test"
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


def start_lab_as_told(command: str, env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    """The printed ``jupyter lab ...`` command, plus what keeps a test's server private."""
    argv = shlex.split(command)
    assert argv[:2] == ["jupyter", "lab"], command
    argv[0] = os.path.join(os.path.dirname(sys.executable), "jupyter")
    argv += [
        "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={free_port()}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]  # fmt: skip
    log = (root / "lab.log").open("wb")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            cwd=root, start_new_session=True)  # fmt: skip


def lab_kernel_names(lab: subprocess.Popen[bytes], root: Path) -> dict[str, str]:
    """Slug -> display name of the kernels the running JupyterLab offers ({} until it answers);
    fails with the server's log if it exited."""
    log = (root / "lab.log").read_text(errors="replace")
    assert lab.poll() is None, f"jupyter lab exited ({lab.returncode}):\n{log[-3000:]}"
    port = lab.args[lab.args.index("--ServerApp.ip=127.0.0.1") + 1].split("=")[1]
    try:
        url = f"http://127.0.0.1:{port}/api/kernelspecs?token={TOKEN}"
        with urllib.request.urlopen(url, timeout=5) as response:
            specs = json.load(response)["kernelspecs"]
    except (OSError, ValueError):
        return {}
    return {slug: entry["spec"]["display_name"] for slug, entry in specs.items()}


@pytest.mark.parametrize("backend", ["openssh", "asyncssh"])
def test_demo_keep_then_follow_the_instructions(backend, tmp_path, no_leftovers):
    """--keep on both backends (asyncssh: a laptop without sshd): JupyterLab started as
    printed (as root too) offers the kernel under the printed name; check, then remove."""
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_PATH="",
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))  # fmt: skip
    result = demo("--keep", "--backend", backend, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    kept = re.search(r"\(pid (\d+)\) .*\n.*kill \d+ && rm -rf (\S+)", out)
    try:
        name = re.search(r'pick "(.+)" in the kernel picker', out).group(1)
        assert f'kernelspec remote_demo ("{name}")' in out
        command = re.search(r"^  (jupyter lab.*?)\s{2,}\(pip", out, re.MULTILINE).group(1)
        lab = start_lab_as_told(command, env, tmp_path)
        try:
            wait_for(lambda: lab_kernel_names(lab, tmp_path).get("remote_demo") == name, 60,
                     "JupyterLab to offer the kept kernel")  # fmt: skip
        finally:
            lab.terminate()
            lab.wait(timeout=20)
        check = subprocess.run([*CLI, "check", "remote_demo"], capture_output=True, text=True,
                               env=env, timeout=60, check=False)  # fmt: skip
        assert check.returncode == 0, check.stdout
        remove = re.search(r"Remove it all with: (.+)", out).group(1)
        remove = remove.replace("remote_kernel ", shlex.join(CLI) + " ", 1)
        subprocess.run(["sh", "-c", remove], env=env, timeout=30, check=True)
        listed = subprocess.run([*CLI, "list"], capture_output=True, text=True, env=env,
                                timeout=30, check=True).stdout  # fmt: skip
        assert "remote_demo" not in listed
        wait_for(lambda: not pid_alive(int(kept.group(1))), 10, "the kept demo host to stop")
        wait_for(lambda: not demo_processes(), 10, "the kept demo host's sessions to end")
    finally:  # a failed test leaves no host either
        kill_pids([int(kept.group(1))])
        shutil.rmtree(kept.group(2), ignore_errors=True)


@pytest.mark.parametrize("backend", ["openssh", "asyncssh"])
def test_demo_keep_interrupted_leaves_nothing(backend, tmp_path, no_leftovers):
    """Ctrl-C once --keep has registered its kernelspec: the spec goes, with the host."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_PATH="",
               TMPDIR=str(tmp))  # fmt: skip
    proc = subprocess.Popen([*CLI, "demo", "--keep", "--backend", backend], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        lines = iter(proc.stdout.readline, "")  # bounded by the test's timeout
        assert any("registered kernelspec remote_demo" in line for line in lines)
        proc.send_signal(signal.SIGINT)  # the kernel's start takes longer than this
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "remote_kernel: interrupted\n"), out + err
    assert not (tmp_path / "data" / "kernels" / "remote_demo").exists()
    assert list(tmp.iterdir()) == []  # the host's keys and configs
    wait_for(lambda: not demo_processes(), 10, "the demo host's sessions to end")
