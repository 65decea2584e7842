"""The kernelspec's argv as VS Code runs it: the client writes a connection file with ports it
chose, substitutes {connection_file} and {resource_dir}, runs argv, and signals the process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient

from kernel_fixtures import PYTHON
from kernels import (
    printed,
    remote_base,
    remote_kernel_dirs,
    remote_processes,
    run_cell,
    wait_for,
)
from sshd import port_is_free

pytestmark = pytest.mark.timeout(120)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
IPYKERNEL_ARGV = [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def launcher_argv() -> list[str]:
    script = shutil.which("jupyter-remote-kernel") or os.path.join(
        os.path.dirname(sys.executable), "jupyter-remote-kernel"
    )
    return [script, "launch", "--kernelspec", "{resource_dir}", "-f", "{connection_file}"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class VSCodeStyleLaunch:
    """Write a connection file, run the spec's argv, connect a client: what VS Code does."""

    def __init__(
        self,
        kernels_dir: Path,
        kernel_name: str,
        workdir: Path,
        cwd: Path | None = None,
        extra: dict[str, Any] | None = None,
        ports: list[int] | None = None,
    ) -> None:
        spec_dir = kernels_dir / kernel_name
        argv = json.loads((spec_dir / "kernel.json").read_text())["argv"]
        ports = ports or free_ports(5)
        self.info: dict[str, Any] = dict(zip([f"{c}_port" for c in CHANNELS], ports))
        self.info.update(
            ip="127.0.0.1", transport="tcp", key="vscode-test-key", signature_scheme="hmac-sha256"
        )
        self.info.update(extra or {})  # what a client may add, e.g. Curve keys
        connection_file = workdir / "kernel-vscode.json"
        connection_file.write_text(json.dumps(self.info))
        connection_file.chmod(0o600)
        argv = [
            a.replace("{resource_dir}", str(spec_dir)).replace(
                "{connection_file}", str(connection_file)
            )
            for a in argv
        ]
        # VS Code starts kernels in the notebook's directory (cwd)
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=cwd)
        self.client: BlockingKernelClient | None = None

    def connect(self) -> BlockingKernelClient:
        """Connect and wait for kernel_info, as VS Code does (no heartbeat verdict while the
        launcher is still starting the remote kernel)."""
        kc = BlockingKernelClient()
        kc.load_connection_info(self.info)
        kc.start_channels(hb=False)
        kc.wait_for_ready(timeout=60)
        self.client = kc
        return kc

    def exit_status(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def close(self) -> str:
        """Stop everything; return what the launcher wrote on stderr."""
        if self.client is not None:
            self.client.stop_channels()
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=20)
        return err

    def ports(self) -> list[int]:
        return [self.info[f"{c}_port"] for c in CHANNELS]


@pytest.fixture
def launch(kernels_dir, tmp_path, no_leftovers):
    """``launch(name)`` runs a spec the VS Code way; everything is checked gone afterwards."""
    launches: list[VSCodeStyleLaunch] = []

    def start(
        kernel_name: str,
        cwd: Path | None = None,
        ports: list[int] | None = None,
        **extra: Any,
    ) -> VSCodeStyleLaunch:
        launches.append(VSCodeStyleLaunch(kernels_dir, kernel_name, tmp_path, cwd, extra, ports))
        return launches[-1]

    yield start
    for item in launches:
        item.close()


def test_vscode_launch_interrupt_and_stop(remote_spec, launch):
    started = launch(remote_spec(argv=launcher_argv()))
    kc = started.connect()
    out, _ = run_cell(kc, "x = 11; import os; print(os.environ['SSH_CONNECTION'])")
    assert out.split()[2] == "127.0.0.1", "the kernel runs in an SSH session"
    msg_id = kc.execute("print('sleeping', flush=True); import time; time.sleep(60)")
    wait_for(lambda: printed(kc, "sleeping"), 10, "the cell to start")
    started.proc.send_signal(signal.SIGINT)
    reply = kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert started.proc.poll() is None, "SIGINT interrupts the kernel, not the launcher"
    # state survived (asserted in the kernel: independent of how stdout is routed)
    assert run_cell(kc, "assert x == 11")[1]["status"] == "ok"
    started.proc.send_signal(signal.SIGTERM)
    assert started.exit_status() == 0
    assert all(port_is_free(p) for p in started.ports())


def test_sighup_stops_too_and_jupyter_style_f_option(remote_spec, launch):
    argv = [*launcher_argv()[:-2], "--f={connection_file}"]
    started = launch(remote_spec(argv=argv))
    run_cell(started.connect(), "pass")
    started.proc.send_signal(signal.SIGHUP)
    assert started.exit_status() == 0


def test_kernel_death_ends_launcher_nonzero(remote_spec, launch):
    started = launch(remote_spec(argv=launcher_argv()))
    started.connect().execute("import os; os._exit(3)")
    assert started.exit_status() == 3
    assert "exited with status 3" in started.close()


def test_client_shutdown_request_ends_launcher_cleanly(remote_spec, launch):
    started = launch(remote_spec(argv=launcher_argv()))
    kc = started.connect()
    kc.shutdown()
    assert started.exit_status() == 0


def test_bad_spec_is_one_line(remote_spec, launch):
    started = launch(remote_spec(argv=launcher_argv(), hostname="typo"))
    assert started.exit_status() == 1
    err = started.close()
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "unknown key(s) 'hostname'" in line


def failure_line(started: VSCodeStyleLaunch) -> str:
    """The last line a failed launcher wrote: exit status 1, no traceback."""
    assert started.exit_status() == 1
    err = started.close()
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_start_failure_is_one_line(remote_spec, launch):
    started = launch(remote_spec(argv=launcher_argv(), python="/nonexistent/python3"))
    assert failure_line(started).endswith("to the full path of an interpreter that exists there")


def test_taken_port_is_one_line(remote_spec, launch):
    """A port of the client's connection file is taken by another program by the time the
    launcher binds it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = launch(remote_spec(argv=launcher_argv()), ports=[*free_ports(4), port])
        line = failure_line(started)
    assert line.endswith(
        f": error: cannot listen on 127.0.0.1:{port}, the hb port of the connection file: "
        f"another program uses it; restart the kernel so that the client picks free ports"
    )


def test_killed_launcher_leaves_no_remote_kernel(remote_spec, launch, remote_tmp):
    """kill -9 of the local side: its SSH connection drops, and the remote agent stops the
    kernel and removes its files after orphan_timeout (nothing keeps burning memory)."""
    started = launch(remote_spec(argv=launcher_argv(), orphan_timeout=2))
    run_cell(started.connect(), "x = 1")
    assert remote_kernel_dirs(remote_tmp)
    started.proc.kill()
    assert started.exit_status() == -signal.SIGKILL
    wait_for(lambda: not remote_processes(remote_tmp), 15, "the remote kernel to be stopped")
    assert remote_kernel_dirs(remote_tmp) == []


def test_vscode_launch_uploads_from_the_notebook_directory(remote_spec, launch, tmp_path):
    notebook_dir, remote_work = tmp_path / "notebooks", tmp_path / "remote-work"
    notebook_dir.mkdir()
    remote_work.mkdir()
    (notebook_dir / "data.csv").write_text("a,b")
    spec = remote_spec(argv=launcher_argv(), upload=["data.csv"], cwd=str(remote_work))
    started = launch(spec, cwd=notebook_dir)
    out, _ = run_cell(started.connect(), "import os; print(os.getcwd(), open('data.csv').read())")
    assert out == f"{remote_work} a,b\n"
    started.proc.send_signal(signal.SIGTERM)
    assert started.exit_status() == 0


def test_curve_keys_of_the_client_encrypt_a_tcp_kernel(remote_spec, launch, remote_tmp):
    """A client that puts Curve keys in its connection file gets an encrypted kernel: the
    keys reach the remote connection file, and only a Curve client can talk to it."""
    public, secret = (key.decode() for key in zmq.curve_keypair())
    spec = remote_spec(argv=launcher_argv(), kernel_argv=IPYKERNEL_ARGV)
    started = launch(spec, curve_publickey=public, curve_secretkey=secret)
    out, reply = run_cell(started.connect(), "print('sealed')")
    assert reply["status"] == "ok" and out == "sealed\n"
    (kernel_dir,) = remote_kernel_dirs(remote_tmp)
    info = json.loads((remote_base(remote_tmp) / kernel_dir / "connection.json").read_text())
    assert (info["transport"], info["curve_secretkey"]) == ("tcp", secret)
    started.proc.send_signal(signal.SIGTERM)
    assert started.exit_status() == 0
    assert "kernel traffic" not in started.close()


def test_tcp_kernel_without_client_keys_is_said_to_be_exposed(remote_spec, launch):
    started = launch(remote_spec(argv=launcher_argv(), kernel_argv=IPYKERNEL_ARGV))
    run_cell(started.connect(), "pass")
    started.proc.send_signal(signal.SIGTERM)
    assert started.exit_status() == 0
    (line,) = [line for line in started.close().splitlines() if "kernel traffic" in line]
    assert "unencrypted loopback tcp ports on testhost" in line and "no Curve keys" in line
