"""The remote agent's daemon lost or disturbed: killed, its socket removed, its disk full.

Kernels must never run unseen: a new daemon adopts the kernels of a dead one (same kernel,
same files, its orphan rules), removes what dead kernels left, and the base dir follows one
rule ($TMPDIR, else /tmp) whatever the disk's state. Real relays, daemons and ipykernels.
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from agents import TIMEOUT, kernel_client, processes_with_tmpdir, run
from disks import fill, mounted_tmpfs

from kernels import wait_for
from sshd import pid_alive

pytestmark = pytest.mark.timeout(120)


def kill_daemon(agent):
    """kill -9 the agent's daemon; its relay sees the socket close and ends."""
    os.kill(agent.hello["daemon_pid"], signal.SIGKILL)
    assert agent.proc.wait(TIMEOUT) == 0
    wait_for(lambda: not pid_alive(agent.hello["daemon_pid"]), 10, "the daemon to die")


def daemons(rtmp):
    """Live daemon processes of this test's TMPDIR (relays have a parent shell of theirs)."""
    found = []
    for pid in processes_with_tmpdir(rtmp):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b'AGENT_MODE":"daemon' in cmdline:
                found.append(pid)
    return found


def test_a_new_daemon_adopts_the_kernels_of_a_killed_one(make_agent):
    a = make_agent()
    reply, kid, key = a.launch(orphan_timeout=None)
    assert reply["ok"], reply
    with kernel_client(reply, key, "ipc") as kc:
        assert run(kc, "x = 6*7")[0]["status"] == "ok"
    kill_daemon(a)
    assert pid_alive(reply["pid"])

    b = make_agent()
    assert b.hello["daemon_pid"] != a.hello["daemon_pid"]
    [k] = b.request("list")["kernels"]
    assert (k["kernel"], k["pid"], k["dir"]) == (kid, reply["pid"], reply["dir"])
    assert k["attached"] == 0 and k["orphan_timeout"] is None
    again = b.request("launch", kernel=kid, argv=["true"], connection={"key": key})
    assert not again["ok"] and "already running" in again["error"]
    att = b.request("attach", kernel=kid)
    assert att["ok"] and att["endpoints"] == reply["endpoints"], att
    with kernel_client(att, key, "ipc") as kc:
        content, out = run(kc, "print(x)")
        assert content["status"] == "ok" and out.strip() == "42"
    stop = b.request("stop", kernel=kid)
    assert stop["ok"], stop
    assert not pid_alive(reply["pid"]) and not os.path.exists(reply["dir"])
    assert b.request("list")["kernels"] == []


def test_adopted_kernels_keep_their_orphan_timeout(make_agent):
    a = make_agent()
    reply, _kid, _ = a.launch(orphan_timeout=2)
    assert reply["ok"], reply
    kill_daemon(a)
    b = make_agent()
    adopted = time.monotonic()
    assert [k["kernel"] for k in b.request("list")["kernels"]] == [_kid]
    wait_for(lambda: not pid_alive(reply["pid"]), 15, "the adopted orphan to be stopped")
    assert time.monotonic() - adopted > 1.0
    wait_for(lambda: not os.path.exists(reply["dir"]), 5, "its dir to be removed")


def test_what_dead_kernels_left_is_removed(make_agent):
    a = make_agent()
    reply, _kid, _ = a.launch(orphan_timeout=None)
    assert reply["ok"], reply
    kill_daemon(a)
    os.killpg(reply["pgid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(reply["pid"]), 10, "the kernel to die")
    assert os.path.exists(reply["dir"])
    b = make_agent()
    assert not os.path.exists(reply["dir"])  # gone before the new daemon's hello
    assert b.request("list")["kernels"] == []


def test_a_removed_socket_dir_is_restored_by_its_daemon(make_agent):
    """A tmp cleaner removes the daemon's dir: the same daemon listens again."""
    a = make_agent()
    reply, kid, _ = a.launch(orphan_timeout=None)
    assert reply["ok"], reply
    sock = a.socket_path()
    subprocess.run(["rm", "-rf", os.path.dirname(sock)], check=True)
    wait_for(lambda: os.path.exists(sock), 10, "the daemon to listen again")
    b = make_agent()
    assert b.hello["daemon_pid"] == a.hello["daemon_pid"]
    assert [k["kernel"] for k in b.request("list")["kernels"]] == [kid]


def test_a_daemon_whose_socket_was_replaced_hands_its_kernels_over(make_agent, rtmp):
    """A relay came before the old daemon noticed its socket was gone and started a second
    daemon: one daemon remains, and it has the kernel."""
    a = make_agent()
    reply, kid, key = a.launch(orphan_timeout=None)
    assert reply["ok"], reply
    os.unlink(a.socket_path())
    b = make_agent()  # at once: no socket, so this relay starts a daemon of its own
    wait_for(lambda: len(daemons(rtmp)) == 1, 15, "a single daemon to remain")
    c = make_agent()
    assert c.hello["daemon_pid"] == daemons(rtmp)[0]
    wait_for(lambda: [k["kernel"] for k in c.request("list")["kernels"]] == [kid], 10,
             "the kernel to be listed")  # fmt: skip
    att = c.request("attach", kernel=kid)
    assert att["ok"], att
    with kernel_client(att, key, "ipc") as kc:
        assert run(kc, "print(1)")[0]["status"] == "ok"
    assert b.hello["event"] == "hello"


@pytest.fixture
def tmpfs(rtmp):
    """A 1 MiB tmpfs, mounted for this test (as a small /tmp)."""
    mnt = rtmp / "small"
    mnt.mkdir()
    with mounted_tmpfs(mnt, "size=1m,mode=1777"):
        yield mnt
        for pid in processes_with_tmpdir(mnt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_base_dir_follows_tmpdir_even_when_it_is_full(make_agent, tmpfs):
    env = dict(os.environ, TMPDIR=str(tmpfs))
    a = make_agent(env=env)
    reply, _kid, _ = a.launch()
    assert reply["ok"], reply
    filler = fill(tmpfs)
    b = make_agent(env=env)
    assert b.hello["event"] == "hello", b.hello
    assert b.hello["base"] == str(tmpfs / f"jupyter-remote-{os.getuid()}")
    assert b.hello["daemon_pid"] == a.hello["daemon_pid"]
    assert [k["pid"] for k in b.request("list")["kernels"]] == [reply["pid"]]
    before = sorted(os.listdir(b.hello["base"]))
    failed, _, _ = b.launch()
    assert not failed["ok"]
    assert failed["error"] == (
        f"cannot write a kernel's files in {b.hello['base']}: No space left on device; "
        f"free space on its file system, or set TMPDIR to another directory for SSH logins "
        f"to this host"
    )
    assert sorted(os.listdir(b.hello["base"])) == before
    filler.unlink()
    again, _, _ = b.launch()
    assert again["ok"], again


def test_an_unwritable_base_is_one_line_and_leaves_nothing(make_agent, tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    a = make_agent(env=dict(os.environ, TMPDIR=str(tmpfs)))
    base = tmpfs / f"jupyter-remote-{os.getuid()}"
    assert a.hello == {
        "event": "fatal",
        "error": f"cannot create {base}: Read-only file system; make it writable, or set "
        f"TMPDIR to another directory for SSH logins to this host",
    }
    assert a.proc.wait(TIMEOUT) == 1
    assert os.listdir(tmpfs) == []
