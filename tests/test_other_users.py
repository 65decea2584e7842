"""Another user of the remote host tries to read a kernel's traffic (issue 12, item 4).

The remote host is this machine; the other user is a real local account (``jrp-other``,
created for the session when missing). It subscribes to the kernel's iopub endpoint on the
remote side, exactly as the kernel listens there, while a cell prints a marker.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import queue
import signal
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_remote_provisioner.encryption import new_keys, usable_keys, wanted
from jupyter_remote_provisioner.errors import LaunchError

from drivers import Driver
from kernel_fixtures import PYTHON
from kernels import remote_base, remote_kernel_dirs, rk, run_cell, run_through_file

pytestmark = pytest.mark.timeout(120)

OTHER_USER = "jrp-other"
EAVESDROP = Path(__file__).with_name("eavesdrop.py")
IPYKERNEL_ARGV = [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
CURVE = {"supported_encryption": ["curve"]}
EXPOSED = (
    "warning: kernel traffic: unencrypted loopback tcp ports on testhost",
    ": other users there can read every cell's code and output; use transport ipc",
)


@pytest.fixture(scope="session")
def other_user() -> Iterator[str]:
    """A second local user; created (and removed afterwards) if this host has none."""
    try:
        pwd.getpwnam(OTHER_USER)
        created = False
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             OTHER_USER], check=True, timeout=30,
        )  # fmt: skip
        created = True
    yield OTHER_USER
    if created:
        subprocess.run(["userdel", OTHER_USER], check=True, timeout=30)


class Eavesdropper:
    """``eavesdrop.py`` as the other user, aimed at one endpoint of a remote kernel."""

    def __init__(self, user: str, directory: Path, url: str, marker: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EAVESDROP), user, str(directory), url, marker],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())

    def line(self, timeout: float = 20) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"the eavesdropper said nothing: {self.proc.stderr}") from None

    def connected(self) -> tuple[str, str]:
        """(plain connection result, ZMQ handshake result)."""
        return self.line().removeprefix("connect "), self.line().removeprefix("handshake ")

    def markers(self) -> int:
        """Stop listening; how many iopub messages carried the marker."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        found = int(self.line().removeprefix("markers "))
        assert self.proc.wait(timeout=10) == 0
        return found


def remote_connection(remote_tmp: Path) -> dict[str, Any]:
    """The connection file the remote agent wrote for the one running kernel (0600)."""
    (kernel_dir,) = remote_kernel_dirs(remote_tmp)
    path = remote_base(remote_tmp) / kernel_dir / "connection.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def iopub_url(info: dict[str, Any], remote_tmp: Path) -> str:
    """The kernel's iopub endpoint on the remote host; an ipc path relative to its TMPDIR."""
    if info["transport"] == "tcp":
        return f"tcp://127.0.0.1:{info['iopub_port']}"
    path = f"{info['ip']}-{info['iopub_port']}"
    return f"ipc://{os.path.relpath(path, remote_tmp)}"


def traffic_lines(command: str, name: str) -> list[str]:
    """The lines of `remote_kernel COMMAND NAME` about the kernel's traffic."""
    return [line for line in rk(command, name).stdout.splitlines() if "kernel traffic" in line]


def eavesdrop_on_a_cell(driver: Driver, user: str, remote_tmp: Path) -> tuple[str, str, int]:
    """While a cell prints a marker 40 times, the other user listens on the kernel's iopub:
    (plain connection, handshake, marker messages read). Our own client sees the marker."""
    marker = f"secret-{uuid.uuid4().hex}"
    spy = Eavesdropper(user, remote_tmp, iopub_url(remote_connection(remote_tmp), remote_tmp),
                       marker)  # fmt: skip
    reached, handshake = spy.connected()
    half = len(marker) // 2  # the code holds the marker in two halves: only output has it
    code = (f"import time\nfor _ in range(40):\n    print({marker[:half]!r} + {marker[half:]!r}, "
            "flush=True)\n    time.sleep(0.05)")  # fmt: skip
    out, reply = run_cell(driver.client(), code)
    assert reply["status"] == "ok" and out.count(marker) == 40
    return reached, handshake, spy.markers()


@pytest.fixture
def driver(no_leftovers: Any) -> Iterator[Any]:
    drivers: list[Driver] = []

    def make(kernel_name: str, **traits: Any) -> Driver:
        drivers.append(Driver("blocking", kernel_name))
        for name, value in traits.items():
            setattr(drivers[-1].km, name, value)
        return drivers[-1]

    yield make
    for d in drivers:
        d.close()


def test_ipc_kernel_is_closed_to_other_users(remote_spec, driver, other_user, remote_tmp):
    d = driver(remote_spec())
    d.start()
    assert remote_connection(remote_tmp)["transport"] == "ipc"
    assert eavesdrop_on_a_cell(d, other_user, remote_tmp) == ("EACCES", "skipped", 0)


def test_tcp_kernel_that_supports_curve_is_encrypted_by_default(
    remote_spec, driver, other_user, remote_tmp
):
    """A kernel_argv kernel listens on tcp; it declares Curve, so its traffic is encrypted
    even under jupyter_client's default transport_encryption ('disabled')."""
    d = driver(remote_spec(kernel_argv=IPYKERNEL_ARGV, metadata=CURVE))
    d.start()
    assert eavesdrop_on_a_cell(d, other_user, remote_tmp) == ("ok", "failed", 0)
    info = remote_connection(remote_tmp)
    assert info["transport"] == "tcp"
    assert info["curve_publickey"] == d.km.curve_publickey.decode()
    assert info["curve_secretkey"] == d.km.curve_secretkey.decode()
    args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10,
                          check=True).stdout  # fmt: skip
    assert info["curve_secretkey"] not in args and info["curve_publickey"] not in args
    d.restart()  # the same keys again: the client keeps its own
    assert remote_connection(remote_tmp)["curve_secretkey"] == info["curve_secretkey"]
    out, reply = run_cell(d.client(), "print('after restart')")
    assert reply["status"] == "ok" and out == "after restart\n"


def test_attach_to_an_encrypted_kernel_gets_its_keys(remote_spec, driver, tmp_path):
    """`remote_kernel attach` writes the kernel's Curve keys into its connection file: a
    client of that file can talk to the encrypted kernel."""
    name = remote_spec(kernel_argv=IPYKERNEL_ARGV, metadata=CURVE)
    d = driver(name)
    d.start()
    file = tmp_path / "attached.json"
    attach = subprocess.Popen(
        [sys.executable, "-m", "jupyter_remote_provisioner", "attach", d.km.kernel_id,
         "--name", name, "-f", str(file)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert attach.stdout is not None and "Attached" in attach.stdout.readline()
        info = json.loads(file.read_text())
        assert info["curve_publickey"] == d.km.curve_publickey.decode()
        out, reply = run_through_file(file, "print('through attach')")
        assert reply["status"] == "ok" and out == "through attach\n"
        attach.send_signal(signal.SIGINT)
        assert attach.wait(15) == 0
    finally:
        if attach.poll() is None:
            attach.kill()
            attach.wait(10)


def test_required_encryption_reaches_an_ipc_kernel(remote_spec, driver, remote_tmp):
    d = driver(remote_spec(metadata=CURVE), transport_encryption="required")
    d.start()
    info = remote_connection(remote_tmp)
    assert info["transport"] == "ipc"
    assert info["curve_publickey"] == d.km.curve_publickey.decode()
    out, reply = run_cell(d.client(), "print(6 * 7)")
    assert reply["status"] == "ok" and out == "42\n"


def test_unencrypted_tcp_is_readable_and_said_so(remote_spec, driver, other_user, remote_tmp):
    """Without Curve, a tcp kernel is open to every user of its host: the other user reads
    the output, and `show` and `check` say so in one line."""
    name = remote_spec(kernel_argv=IPYKERNEL_ARGV)
    d = driver(name)
    d.start()
    assert "curve_secretkey" not in remote_connection(remote_tmp)
    reached, handshake, read = eavesdrop_on_a_cell(d, other_user, remote_tmp)
    assert (reached, handshake) == ("ok", "ok") and read > 0
    d.close()
    (shown,) = traffic_lines("show", name)
    assert shown.startswith(EXPOSED[0]) and EXPOSED[1] in shown
    assert traffic_lines("check", name) == [f"  [warn] {shown.removeprefix('warning: ')}"]


def test_show_and_check_say_when_traffic_is_private(remote_spec):
    for name, words in (
        (remote_spec(), "Unix sockets in a private directory on testhost"),
        (remote_spec(kernel_argv=IPYKERNEL_ARGV, metadata=CURVE), "encrypted with CurveZMQ"),
    ):
        (shown,) = traffic_lines("show", name)
        assert shown.startswith("kernel traffic: ") and words in shown
        assert traffic_lines("check", name) == [f"  [ok]   {shown}"]


@pytest.mark.parametrize(
    ("policy", "declared", "transport", "encrypted"),
    [
        ("disabled", False, "tcp", False),  # nothing to encrypt with: show/check warn
        ("disabled", True, "tcp", True),  # tcp is open to every user of the host
        ("disabled", True, "ipc", False),  # a private directory is enough
        ("auto", True, "ipc", True),
        ("auto", False, "tcp", False),
        ("required", False, "ipc", True),  # jupyter_client refuses such a spec first
    ],
)
def test_when_traffic_is_encrypted(policy, declared, transport, encrypted):
    assert wanted(policy, declared, transport) is encrypted


def test_an_ipykernel_older_than_7_4_gets_no_keys():
    keys, log = new_keys(), logging.getLogger("test")
    assert usable_keys(keys, False, "7.4.0", "gpu", "python3", "tcp", log) == keys
    assert usable_keys(keys, False, "6.29.5", "gpu", "python3", "tcp", log) == {}
    with pytest.raises(LaunchError, match=r"^transport encryption is required but ipykernel "
                       r"6\.29\.5 on gpu cannot use CurveZMQ \(7\.4 or newer can\); upgrade"):  # fmt: skip
        usable_keys(keys, True, "6.29.5", "gpu", "python3", "ipc", log)
