"""`remote_kernel ps`, `stop` and `attach`, and what happens to a kernel whose local side is
killed: reaped after its orphan_timeout, or kept (null) for a later `attach`.

The "Jupyter server" is a real process running a KernelManager on a remote kernelspec; it
is killed with SIGKILL, so it shuts nothing down.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient

from kernel_fixtures import PYTHON
from kernels import (
    one_line_error,
    remote_kernel_dirs,
    remote_kernels,
    remote_processes,
    rk,
    run_cell,
    wait_for,
    write_spec,
)
from sshd import wait_until

pytestmark = pytest.mark.timeout(180)

SERVER = """
import sys
from jupyter_client import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
kc.execute_interactive("x = 'set before the crash'", timeout=30)
print(km.kernel_id, flush=True)
sys.stdin.read()
"""


def crashed_server(kernel_name: str) -> str:
    """Start a kernel from a server process, set x, SIGKILL the server; return the kernel id."""
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, kernel_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        kernel_id = server.stdout.readline().strip()  # type: ignore[union-attr]
    finally:
        server.kill()
        server.wait(10)
    assert kernel_id, "the server process did not start its kernel"
    return kernel_id


def listed(name: str, kernel_id: str) -> dict | None:
    """What `ps NAME --json` says about ``kernel_id`` (None: not listed)."""
    for kernel in json.loads(rk("ps", name, "--json").stdout):
        if kernel["kernel"] == kernel_id:
            return kernel
    return None


def test_orphan_is_reaped_after_orphan_timeout(remote_spec, remote_tmp, no_leftovers):
    name = remote_spec(orphan_timeout=3)
    kernel_id = crashed_server(name)
    # the host counts orphan_timeout from when it saw the client go, never before the crash
    assert not wait_until(lambda: not remote_kernels(remote_tmp), 2.0), "reaped too early"
    wait_for(lambda: remote_processes(remote_tmp) == [], 30, "the orphan to be reaped")
    assert remote_kernel_dirs(remote_tmp) == []
    assert rk("ps", name).stdout.strip() == "No remote kernels running."
    assert "no kernel" in rk("stop", kernel_id, check=False).stderr


def test_kept_kernel_is_listed_attached_and_stopped(remote_spec, tmp_path, no_leftovers):
    name = remote_spec(orphan_timeout=None)
    kernel_id = crashed_server(name)
    wait_for(lambda: (k := listed(name, kernel_id)) and k["attached"] == 0, 30,
             "ps to list the kernel with no client attached")  # fmt: skip
    [header, row] = rk("ps", name).stdout.splitlines()
    assert header.split()[:3] == ["ID", "KERNELSPEC", "HOST"]
    assert row.startswith(f"{kernel_id[:8]}  {name}  ") and row.endswith("kept")
    assert header.split()[-3:] == ["UNATTENDED", "IF", "UNATTENDED"]
    assert re.search(r"  idle \d+s  .*  0 +\d+s +kept$", row), row  # state, clients, unattended

    file = tmp_path / "existing.json"
    attach = subprocess.Popen(
        [sys.executable, "-m", "jupyter_remote_provisioner", "attach", kernel_id[:8], "--name",
         name, "-f", str(file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(file.exists, 30, "attach to write the connection file")
        assert file.stat().st_mode & 0o777 == 0o600
        kc = BlockingKernelClient()
        kc.load_connection_file(str(file))
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=30)
            out, reply = run_cell(kc, "print(x)")
            assert reply["status"] == "ok" and out.strip() == "set before the crash"
        finally:
            kc.stop_channels()
        assert listed(name, kernel_id)["attached"] == 1
        attach.send_signal(signal.SIGINT)  # Ctrl-C detaches; the kernel runs on
        assert attach.wait(15) == 0
        assert not file.exists()
    finally:
        if attach.poll() is None:
            attach.kill()
            attach.wait(10)
    assert "Detached" in attach.stdout.read()  # type: ignore[union-attr]
    assert listed(name, kernel_id)["attached"] == 0

    stopped = rk("stop", kernel_id[:8], "--name", name)
    assert f"Stopped kernel {kernel_id}" in stopped.stdout
    assert rk("ps", name).stdout.strip() == "No remote kernels running."


def test_attach_to_unknown_kernel_is_one_line(remote_spec, no_leftovers):
    name = remote_spec()
    proc = rk("attach", "0000dead", "--name", name, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no kernel 0000dead is running on" in proc.stderr
    assert "remote_kernel ps" in proc.stderr


def test_ps_of_an_unreachable_host_is_one_line(kernels_dir: Path, remote_spec, no_leftovers):
    name = remote_spec(host="root@127.0.0.1:1", ssh_config=None, connect_timeout=3)
    proc = rk("ps", name, check=False)
    assert proc.returncode == 1 and "refused the SSH connection" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stdout == "", "an unreachable host is not an empty host"


@pytest.mark.parametrize("command", ["stop", "attach"])
def test_stop_or_attach_on_an_unreachable_host(remote_spec, command, no_leftovers):
    name = remote_spec(host="root@127.0.0.1:1", ssh_config=None, connect_timeout=3)
    message = one_line_error(rk(command, "0000dead", "--name", name, check=False))
    assert message == (
        "cannot look for kernel 0000dead: could not reach 127.0.0.1:1: host 127.0.0.1:1 "
        "refused the SSH connection; check that sshd runs there and listens on port 1; run "
        "the command again once the host is reachable"
    )


@pytest.fixture
def three_ways(ssh_env, tmp_path, monkeypatch) -> list[str]:
    """Three kernelspecs, alone in a Jupyter dir of their own, that reach the test host in
    different ways: its ssh-config alias, its address, its address with another key file."""
    data = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    key_copy = tmp_path / "id_copy"
    shutil.copy(ssh_env.identity_file, key_copy)
    key_copy.chmod(0o600)
    address = {"host": f"{ssh_env.user}@{ssh_env.host}:{ssh_env.port}", "ssh_config": None,
               "known_hosts": str(ssh_env.known_hosts), "python": PYTHON}  # fmt: skip
    configs = {
        "by_alias": {"host": ssh_env.alias, "ssh_config": str(ssh_env.ssh_config),
                     "python": PYTHON, "orphan_timeout": None},
        "by_address": {**address, "identity_file": str(ssh_env.identity_file)},
        "by_other_key": {**address, "identity_file": str(key_copy)},
    }  # fmt: skip
    return [write_spec(data / "kernels", name, config) for name, config in configs.items()]


def test_one_kernel_reached_three_ways_is_one_kernel(three_ways, tmp_path, no_leftovers):
    """ps lists it once (with every kernelspec that reaches it); stop and attach take its
    full id; an empty id stops and attaches nothing."""
    kernel_id = crashed_server(three_ways[0])
    try:
        [_, row] = rk("ps").stdout.splitlines()
        assert row.startswith(f"{kernel_id[:8]}  by_alias  ")
        [listed] = json.loads(rk("ps", "--json").stdout)
        assert listed["kernel"] == kernel_id and listed["kernelspecs"] == sorted(three_ways)
        for command in ("stop", "attach"):
            assert one_line_error(rk(command, "", check=False)).startswith("no kernel id given; ")
        impossible = tmp_path / "a-file"
        impossible.write_text("")
        assert one_line_error(rk("attach", kernel_id, "-f", f"{impossible}/c.json", check=False)) \
            == f"cannot write the connection file {impossible}/c.json: {impossible} is not a " \
            f"directory; give another path with -f"  # fmt: skip
        assert [k["kernel"] for k in json.loads(rk("ps", "--json").stdout)] == [kernel_id]
    finally:
        stopped = rk("stop", kernel_id, check=False)
        if stopped.returncode:  # never leave it running: stop it through one kernelspec
            rk("stop", kernel_id, "--name", three_ways[0], check=False)
    assert stopped.stdout.startswith(f"Stopped kernel {kernel_id} on "), stopped.stderr
    assert rk("ps").stdout == "No remote kernels running.\n"
