"""The demo command's throwaway SSH host, on both backends: ssh, a kernel, cleanup, --keep."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from jupyter_remote_provisioner import demohost
from jupyter_remote_provisioner.demohost import DemoHost
from jupyter_remote_provisioner.errors import RemoteKernelError
from jupyter_remote_provisioner.pool import close_kept_connections

from kernels import Leftovers, interrupt_sleeping_cell, run_cell, wait_for, write_spec
from sshd import pid_alive, port_is_free

pytestmark = pytest.mark.timeout(120)
BACKENDS = ("openssh", "asyncssh")


def ssh(host: DemoHost, *command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``command`` through the system OpenSSH client with the host's ssh_config."""
    argv = ["ssh", "-F", str(host.ssh_config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    argv += ["-l", user] if user else []
    return subprocess.run(
        [*argv, host.alias, *command], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture(params=BACKENDS)
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DemoHost]:
    """A started DemoHost; its sessions' TMPDIR is private, so kernel files are isolated."""
    session_tmp = tmp_path_factory.mktemp("dtmp")  # short: ipc socket paths must fit
    h = DemoHost(
        tmp_path_factory.mktemp("demo") / "host",
        backend=request.param,
        session_env={"TMPDIR": str(session_tmp)},
    )
    h.start()
    yield h
    h.stop()


def test_auto_picks_openssh_when_installed_else_asyncssh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DemoHost(tmp_path).backend == "openssh"  # the test machine has /usr/sbin/sshd
    monkeypatch.setattr(demohost, "find_sshd", lambda: None)
    assert DemoHost(tmp_path).backend == "asyncssh"


def test_ssh_echo_with_strict_host_key_checking(host: DemoHost) -> None:
    res = ssh(host, "echo", "ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "ok\n"
    assert stat.S_IMODE(host.identity_file.stat().st_mode) == 0o600
    assert host.known_hosts.read_text().startswith(f"[127.0.0.1]:{host.port} ssh-ed25519 ")
    config = host.ssh_config.read_text()
    assert f"Host {host.alias}\n" in config and "StrictHostKeyChecking yes" in config
    assert (host.pid is not None) == (host.backend == "openssh")


def test_only_the_current_user_may_log_in(host: DemoHost) -> None:
    other = "nobody" if host.user != "nobody" else "root"
    res = ssh(host, "echo", "ok", user=other)
    assert res.returncode == 255 and res.stdout == ""


def test_exec_passes_binary_stdin_stdout_stderr_and_status(host: DemoHost) -> None:
    """What the agent relies on: a large binary stdin, EOF when it ends, the exit status."""
    data = os.urandom(3_000_000)
    argv = ["ssh", "-F", str(host.ssh_config), "-o", "BatchMode=yes", host.alias]
    res = subprocess.run(
        [*argv, "cat; echo done >&2; exit 3"],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (res.returncode, res.stdout, res.stderr) == (3, data, b"done\n")


def test_provisioner_runs_interrupts_and_stops_a_kernel(host: DemoHost, kernels_dir: Path) -> None:
    leftovers = Leftovers.snapshot(Path(host.session_env["TMPDIR"]))
    config = {"host": host.alias, "ssh_config": str(host.ssh_config), "python": sys.executable}
    km = KernelManager(kernel_name=write_spec(kernels_dir, f"demo_{host.backend}", config))
    km.start_kernel()
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        out, reply = run_cell(kc, 'import os; print(os.environ["SSH_CONNECTION"])')
        assert reply["status"] == "ok"
        assert out.split()[2:] == ["127.0.0.1", str(host.port)]  # the server side
        assert (
            interrupt_sleeping_cell(kc, km.interrupt_kernel)["content"]["ename"]
            == "KeyboardInterrupt"
        )
        assert run_cell(kc, "print(6 * 7)")[0] == "42\n"  # the kernel survived the interrupt
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    # The agent exits once the connection closes: kept after the last kernel for
    # connection_persist, closed at the end of the process as here.
    close_kept_connections(timeout=10)
    wait_for(lambda: not demohost.session_pids(host.marker), 15, "the remote processes to end")
    leftovers.assert_clean(threads=host.backend != "asyncssh")


@pytest.mark.parametrize("processes", ["/proc", "ps"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_leaves_nothing_behind(
    backend: str, processes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also without /proc (macOS): the host then finds its sessions' processes with ps."""
    if processes == "ps":
        monkeypatch.setattr(demohost, "PROC", tmp_path / "no-proc")
    threads = set(threading.enumerate())
    h = DemoHost(tmp_path / "host", backend=backend)
    h.start()
    # A live session and a detached process it started, both still running at stop().
    session = subprocess.Popen(
        ["ssh", "-F", str(h.ssh_config), "-o", "BatchMode=yes", h.alias,
         "setsid sleep 300 </dev/null >/dev/null 2>&1 & exec sleep 301"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: len(demohost.session_pids(h.marker)) >= 2, 10, "the sleeps to start")
        sshd = h.pid
        h.stop()
        assert session.wait(timeout=10) != 0  # the client lost its session
    finally:
        session.kill()
        session.wait(timeout=5)
    assert demohost.session_pids(h.marker) == []
    assert sshd is None or not pid_alive(sshd)
    assert port_is_free(h.port)
    assert not (tmp_path / "host").exists()  # keys and configs are gone with it
    wait_for(lambda: set(threading.enumerate()) <= threads, 10, "the server's threads to end")


def test_failed_start_cleans_up_and_says_why(tmp_path: Path) -> None:
    h = DemoHost(tmp_path / "host", backend="openssh", session_env={"JRP_BAD": "two words"})
    with pytest.raises(RemoteKernelError, match="did not start: .*Invalid environment") as info:
        h.start()  # SetEnv JRP_BAD=two words: sshd rejects its config and exits
    assert "\n" not in str(info.value)
    assert not (tmp_path / "host").exists()
    assert h.pid is None and demohost.session_pids(h.marker) == []


def test_refuses_a_workdir_it_does_not_own(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("keep me")
    with pytest.raises(RemoteKernelError, match="not empty"):
        DemoHost(tmp_path, backend="asyncssh").start()
    DemoHost(tmp_path).stop()
    assert (tmp_path / "precious").read_text() == "keep me"


@pytest.mark.parametrize("backend", BACKENDS)
def test_detached_host_outlives_its_process_until_killed(backend: str, tmp_path: Path) -> None:
    """``demo --keep`` on both backends: the embedded server (no sshd, as on most laptops)
    moves to a process of its own."""
    workdir = tmp_path / "kept"
    script = (
        "import sys; from pathlib import Path; from jupyter_remote_provisioner.demohost import "
        "DemoHost; h = DemoHost(Path(sys.argv[1]), backend=sys.argv[2]); h.start(); h.detach(); "
        "print(h.describe_kept())"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(workdir), backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    match = re.search(r"kill (\d+) && rm -rf (\S+)$", res.stdout.strip())
    assert match, res.stdout
    pid = int(match.group(1))
    try:
        assert pid_alive(pid)  # its parent (the python above) has exited
        h = DemoHost(workdir)  # only to reuse the file names; never started
        assert ssh(h, "echo", "ok").stdout == "ok\n"
        stop = subprocess.run(
            ["sh", "-c", match.group(0)], capture_output=True, text=True, timeout=30, check=False
        )
        assert stop.returncode == 0, stop.stderr
        wait_for(lambda: not pid_alive(pid), 10, "the kept sshd to exit")
        assert not workdir.exists()
    finally:
        demohost.kill_pids([pid])
        shutil.rmtree(workdir, ignore_errors=True)
