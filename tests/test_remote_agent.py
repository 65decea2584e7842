"""Tests for the remote agent, run locally exactly as the provisioner runs it over SSH.

Real processes and real ipykernels, no mocks. Every wait is bounded by a deadline.
"""

import ast
import importlib.metadata
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from agents import (
    AGENT_SOURCE,
    CHANNELS,
    TIMEOUT,
    bootstrap_command,
    daemon_gone,
    is_exited,
    kernel_client,
    kernel_dirs,
    run,
    wait_stdout,
)

from jupyter_remote_provisioner.remote.common import PROTOCOL

from kernels import wait_for
from sshd import pid_alive

# What the daemon's `list` says this host is (hosts reached under two names are one).
HOST_ID = f"{Path('/etc/machine-id').read_text().strip()}/{socket.gethostname()}"


def test_bootstrap_matches_the_local_side():
    from jupyter_remote_provisioner.agent import remote_command

    assert remote_command(sys.executable) == bootstrap_command(sys.executable)


# -- hello and basic protocol -------------------------------------------------------------


def test_hello(agent, rtmp):
    h = agent.hello
    assert h["protocol"] == PROTOCOL and h["pid"] == h["daemon_pid"] != agent.proc.pid
    assert h["python"] == ".".join(map(str, sys.version_info[:3]))
    assert h["executable"] == sys.executable
    assert h["ipykernel"] == importlib.metadata.version("ipykernel")
    assert h["home"] == os.path.expanduser("~")
    assert h["base"] == os.path.join(rtmp, f"jupyter-remote-{os.getuid()}")
    st = os.lstat(h["base"])
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid() and h["user"]
    sock = os.lstat(agent.socket_path())
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600


def test_source_is_ascii_and_py36_syntax():
    ast.parse(AGENT_SOURCE.decode("ascii"), feature_version=(3, 6))
    for module in (Path(__file__).parent.parent / "jupyter_remote_provisioner/remote").glob("*.py"):
        ast.parse(module.read_text("ascii"), feature_version=(3, 6))


def test_misc_requests(agent):
    t0 = time.time()
    pong = agent.request("ping")
    assert pong["ok"] and t0 - 1 < pong["time"] < time.time() + 1
    bad = agent.request("frobnicate")
    assert not bad["ok"] and "frobnicate" in bad["error"]
    agent.send_raw(b"this is not json\n")
    assert agent.wait_event(lambda e: e["event"] == "log")["level"] == "warning"
    agent.send_raw(b'{"op": "ping"}\n')
    assert "id" in agent.wait_event(lambda e: e["event"] == "log")["message"]
    nosuch = agent.request("signal", kernel="nope", signum=2)
    assert not nosuch["ok"] and nosuch["error"] == "no kernel nope on this host"
    bad_launch = agent.request("launch", kernel="x", argv="not a list")
    assert not bad_launch["ok"] and "argv" in bad_launch["error"]
    listing = agent.request("list")
    assert listing == {"re": agent.next_id, "ok": True, "kernels": [], "host_id": HOST_ID}


@pytest.mark.parametrize("problem", ["mode", "symlink"])
def test_unsafe_base_dir_is_fatal(make_agent, rtmp, problem):
    tmp_path = rtmp
    base = tmp_path / f"jupyter-remote-{os.getuid()}"
    if problem == "mode":
        base.mkdir(mode=0o755)
        base.chmod(0o755)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        base.symlink_to(tmp_path / "elsewhere")
    a = make_agent(env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert a.hello["event"] == "fatal" and str(base) in a.hello["error"]
    assert a.proc.wait(TIMEOUT) == 1


# -- launching real kernels -----------------------------------------------------------------


def test_launch_ipc_kernel(agent):
    reply, kid, key = agent.launch(transport="ipc")
    assert reply["ok"], reply
    d = reply["dir"]
    assert os.path.dirname(d) == agent.hello["base"] and os.path.basename(d).startswith(kid[:8])
    assert reply["endpoints"] == {ch: f"{d}/k-{i}" for i, ch in enumerate(CHANNELS, 1)}
    assert reply["pgid"] == reply["pid"]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    cfile = os.path.join(d, "connection.json")
    assert stat.S_IMODE(os.stat(cfile).st_mode) == 0o600
    assert json.loads(Path(cfile).read_text())["key"] == key
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert key not in ps.stdout
    with kernel_client(reply, key, "ipc") as kc:
        assert run(kc, "x = 6*7")[0]["status"] == "ok"
        content, out = run(kc, "print(x)")
        assert content["status"] == "ok" and out.strip() == "42"
    listing = agent.request("list")["kernels"]
    assert [(k["kernel"], k["pid"], k["dir"]) for k in listing] == [(kid, reply["pid"], d)]
    assert time.time() - 120 < listing[0]["started"] <= time.time()


def test_launch_tcp_kernel(agent):
    reply, _kid, key = agent.launch(transport="tcp")
    assert reply["ok"], reply
    ports = [reply["endpoints"][ch] for ch in CHANNELS]
    assert len(set(ports)) == 5 and all(isinstance(p, int) for p in ports)
    for p in ports:
        socket.create_connection(("127.0.0.1", p), timeout=5).close()
    with kernel_client(reply, key, "tcp") as kc:
        content, out = run(kc, "print(6*7)")
        assert content["status"] == "ok" and out.strip() == "42"


def test_sigint_interrupts_and_state_survives(agent):
    reply, kid, key = agent.launch()
    assert reply["ok"], reply
    with kernel_client(reply, key, "ipc") as kc:
        run(kc, "x = 42")
        msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(30)")
        wait_stdout(kc, msg_id, "sleeping")
        t0 = time.monotonic()
        assert agent.request("signal", kernel=kid, signum=int(signal.SIGINT))["ok"]
        shell = kc.get_shell_msg(timeout=TIMEOUT)
        assert shell["parent_header"]["msg_id"] == msg_id
        assert shell["content"]["status"] == "error"
        assert shell["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 20
        content, out = run(kc, "print(x)")
        assert content["status"] == "ok" and out.strip() == "42"


def test_concurrent_launches(agent):
    results = [None, None]

    def go(i):
        results[i] = agent.launch(transport="tcp")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 15)
    assert all(r and r[0]["ok"] for r in results), results
    (r1, _, k1), (r2, _, k2) = results
    assert r1["dir"] != r2["dir"]
    assert not set(r1["endpoints"].values()) & set(r2["endpoints"].values())
    for reply, key in ((r1, k1), (r2, k2)):
        with kernel_client(reply, key, "tcp") as kc:
            assert run(kc, "print(6*7)")[1].strip() == "42"


# -- failures --------------------------------------------------------------------------------


def test_kernel_exits_during_start(agent):
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('boom-marker\\n'); sys.exit(3)"]
    reply, kid, _ = agent.launch(argv=argv)
    assert not reply["ok"]
    assert reply["status"] == 3 and reply["error"] == "kernel exited with status 3 during start"
    assert "boom-marker" in reply["log_tail"]
    assert kernel_dirs(agent, kid) == []


def test_missing_ipykernel_module(agent):
    argv = [sys.executable, "-m", "no_such_module_xyz", "-f", "{connection_file}"]
    reply, kid, _ = agent.launch(argv=argv)
    assert not reply["ok"] and reply["status"] == 1
    assert "No module named" in reply["log_tail"]
    assert kernel_dirs(agent, kid) == []


def test_missing_executable(agent):
    reply, kid, _ = agent.launch(argv=["/nonexistent/python3", "-f", "{connection_file}"])
    assert not reply["ok"] and reply["error"].startswith("cannot run /nonexistent/python3: ")
    assert kernel_dirs(agent, kid) == []


def test_start_timeout_kills_kernel(agent):
    code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    reply, kid, _ = agent.launch(argv=[sys.executable, "-c", code], timeout=2.0)
    assert not reply["ok"] and reply["error"] == "kernel did not start listening within 2 s"
    assert kernel_dirs(agent, kid) == []
    if reply["log_tail"].startswith("pid "):
        pid = int(reply["log_tail"].split()[1])
        wait_for(lambda: not pid_alive(pid), 10, "timed-out kernel to die")


def test_missing_cwd(agent):
    reply, kid, _ = agent.launch(cwd="/nonexistent/dir")
    assert reply == {
        "re": agent.next_id,
        "ok": False,
        "error": "remote working directory /nonexistent/dir does not exist",
    }
    assert kernel_dirs(agent, kid) == []


def test_cwd_that_is_a_file(agent, rtmp):
    a_file = rtmp / "notes.txt"
    a_file.write_text("")
    reply, kid, _ = agent.launch(cwd=str(a_file))
    assert (
        not reply["ok"]
        and reply["error"] == f"remote working directory {a_file} is not a directory"
    )
    assert kernel_dirs(agent, kid) == []


@pytest.mark.parametrize("timeout", [0, -1, "60", None])
def test_launch_timeout_must_be_positive(agent, timeout):
    """0 is refused as the provisioner refuses it; it used to become 60 s silently."""
    conn = {"key": "k", "signature_scheme": "hmac-sha256", "kernel_name": "python3"}
    rid = agent.send("launch", kernel="t0", argv=[sys.executable], connection=conn, env={},
                     timeout=timeout)  # fmt: skip
    reply = agent.wait_reply(rid)
    assert reply["error"] == "launch_timeout must be a number of seconds > 0"
    assert agent.request("list")["kernels"] == []


def test_env_name_with_equals_sign(agent):
    reply, kid, _ = agent.launch(env={"A=B": "1"})
    assert not reply["ok"] and reply["error"].startswith("invalid environment variable 'A=B'")
    assert kernel_dirs(agent, kid) == []


# -- exits, signals, shutdown -------------------------------------------------------------


def test_exit_event(agent):
    reply, kid, key = agent.launch()
    assert reply["ok"], reply
    with kernel_client(reply, key, "ipc") as kc:
        kc.execute("import os; os._exit(1)")
        event = agent.wait_event(lambda e: e["event"] == "exited", timeout=10)
    assert event["kernel"] == kid and event["status"] == 1
    assert not os.path.exists(reply["dir"])
    assert agent.request("list")["kernels"] == []
    gone = agent.request("signal", kernel=kid, signum=int(signal.SIGINT))
    assert not gone["ok"] and "no kernel" in gone["error"]


def test_sigterm_kills_kernel_and_children(agent):
    reply, kid, key = agent.launch()
    assert reply["ok"], reply
    with kernel_client(reply, key, "ipc") as kc:
        # The child ignores SIGTERM, so only the agent's cleanup SIGKILL can end it.
        code = (
            "import subprocess\n"
            "p = subprocess.Popen(['sh', '-c', \"trap '' TERM; exec sleep 300\"])\n"
            "print(p.pid)"
        )
        content, out = run(kc, code)
        assert content["status"] == "ok"
    child = int(out.strip())
    assert pid_alive(child)
    assert agent.request("signal", kernel=kid, signum=int(signal.SIGTERM))["ok"]
    event = agent.wait_event(lambda e: e["event"] == "exited", timeout=10)
    assert event["kernel"] == kid and event["status"] != 0
    wait_for(lambda: not pid_alive(child), 10, "kernel's child to die")
    assert not os.path.exists(reply["dir"])


def launch_two_stubborn_kernels(agent):
    """Two kernels (ipc and tcp); the first ignores SIGTERM so it needs the SIGKILL."""
    launched = []
    for transport in ("ipc", "tcp"):
        reply, _kid, key = agent.launch(transport=transport)
        assert reply["ok"], reply
        launched.append(reply)
        if transport == "ipc":
            with kernel_client(reply, key, transport) as kc:
                run(kc, "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    return launched


def test_eof_stops_everything(agent):
    launched = launch_two_stubborn_kernels(agent)
    t0 = time.monotonic()
    assert agent.close(timeout=15) == 0
    assert time.monotonic() - t0 < 10
    for reply in launched:
        wait_for(lambda r=reply: not pid_alive(r["pid"]), 5, "kernel to die")
        assert not os.path.exists(reply["dir"])
    wait_for(lambda: daemon_gone(agent), 10, "the daemon to exit")


def test_sigterm_to_agent_stops_everything(agent):
    launched = launch_two_stubborn_kernels(agent)
    os.kill(agent.proc.pid, signal.SIGTERM)
    assert agent.proc.wait(15) == 0
    for reply in launched:
        wait_for(lambda r=reply: not pid_alive(r["pid"]), 5, "kernel to die")
        assert not os.path.exists(reply["dir"])
    wait_for(lambda: daemon_gone(agent), 10, "the daemon to exit")


# -- the daemon: kernels that outlive the channel -------------------------------------------


def test_daemon_outlives_the_relay(make_agent):
    a = make_agent()
    reply, kid, key = a.launch(orphan_timeout=None)
    assert reply["ok"], reply
    with kernel_client(reply, key, "ipc") as kc:
        assert run(kc, "x = 6*7")[0]["status"] == "ok"
    assert a.close() == 0
    assert pid_alive(reply["pid"]) and pid_alive(a.hello["daemon_pid"])

    b = make_agent()
    assert b.hello["daemon_pid"] == a.hello["daemon_pid"]
    [k] = b.request("list")["kernels"]
    assert (k["kernel"], k["pid"], k["dir"]) == (kid, reply["pid"], reply["dir"])
    assert k["attached"] == 0 and k["orphan_timeout"] is None and k["orphaned_for"] >= 0
    att = b.request("attach", kernel=kid)
    assert att["ok"], att
    assert [att[f] for f in ("pid", "pgid", "dir", "endpoints")] == [
        reply[f] for f in ("pid", "pgid", "dir", "endpoints")
    ]
    [k] = b.request("list")["kernels"]
    assert k["attached"] == 1 and k["orphaned_for"] is None
    assert att["connection"] == {"key": key, "signature_scheme": "hmac-sha256",
                                 "kernel_name": "python3"}  # fmt: skip
    with kernel_client(att, key, "ipc") as kc:
        content, out = run(kc, "print(x)")
        assert content["status"] == "ok" and out.strip() == "42"

    stop = b.request("stop", kernel=kid)
    assert stop["ok"] and stop["status"] == -signal.SIGTERM, stop
    event = b.wait_event(is_exited, timeout=1)  # sent before the stop reply
    assert event["kernel"] == kid and event["status"] == stop["status"]
    assert not pid_alive(reply["pid"]) and not os.path.exists(reply["dir"])
    assert b.request("list")["kernels"] == []
    gone = b.request("attach", kernel=kid)
    assert not gone["ok"] and gone["error"] == f"no kernel {kid} on this host"
    assert gone["exited"] == stop["status"]
    assert pid_alive(b.hello["daemon_pid"])  # b is still connected
    assert b.close() == 0
    wait_for(lambda: daemon_gone(b), 10, "the daemon to exit")
    assert os.listdir(b.hello["base"] + "-agent") == []  # no socket, lock or log left


def test_orphan_timeout_stops_the_kernel_later(make_agent):
    a = make_agent()
    reply, _kid, _ = a.launch(orphan_timeout=2)
    assert reply["ok"], reply
    assert a.close() == 0
    closed = time.monotonic()
    assert pid_alive(reply["pid"])
    wait_for(lambda: not pid_alive(reply["pid"]), 10, "the orphaned kernel to be stopped")
    assert time.monotonic() - closed > 1.0  # it was kept for (about) its orphan_timeout
    wait_for(lambda: not os.path.exists(reply["dir"]), 5, "its dir to be removed")
    wait_for(lambda: daemon_gone(a), 10, "the daemon to exit")


def test_closing_the_relay_stops_kernels_by_default(make_agent):
    a = make_agent()
    reply, _kid, _ = a.launch()
    assert reply["ok"], reply
    t0 = time.monotonic()
    assert a.close() == 0
    wait_for(lambda: not pid_alive(reply["pid"]), 5, "the kernel to die")
    assert time.monotonic() - t0 < 5 and not os.path.exists(reply["dir"])
    wait_for(lambda: daemon_gone(a), 10, "the daemon to exit")


def test_simultaneous_relays_start_one_daemon(make_agent):
    agents, barrier = [None] * 4, threading.Barrier(4)

    def go(i):
        barrier.wait()
        agents[i] = make_agent()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(a and a.hello["event"] == "hello" for a in agents), agents
    assert len({a.hello["daemon_pid"] for a in agents}) == 1
    assert all(a.request("ping")["ok"] for a in agents)
    for a in agents:
        assert a.close() == 0
    wait_for(lambda: daemon_gone(agents[0]), 10, "the daemon to exit")


def test_exited_event_goes_to_every_client_holding_the_kernel(make_agent):
    a, b = make_agent(), make_agent()
    assert a.hello["daemon_pid"] == b.hello["daemon_pid"]
    ra, ka, _ = a.launch()
    rb, kb, _ = b.launch()
    assert ra["ok"] and rb["ok"]
    os.killpg(ra["pgid"], signal.SIGKILL)
    assert a.wait_event(is_exited, timeout=10)["kernel"] == ka
    assert b.request("ping")["ok"]  # anything sent to b before now has arrived
    assert not [e for e in b.events if is_exited(e)]
    # a attaches to b's kernel: both hold it, so b leaving does not orphan it
    assert a.request("attach", kernel=kb)["ok"]
    assert [k["attached"] for k in b.request("list")["kernels"]] == [2]
    c = make_agent()
    assert b.close() == 0
    [k] = c.request("list")["kernels"]
    assert k["attached"] == 1 and k["orphaned_for"] is None and pid_alive(rb["pid"])
    assert c.request("attach", kernel=kb)["ok"]
    os.killpg(rb["pgid"], signal.SIGKILL)
    assert a.wait_event(is_exited, timeout=10)["kernel"] == kb
    assert c.wait_event(is_exited, timeout=10)["kernel"] == kb


def test_silent_client_is_dropped_and_its_kernels_orphaned(make_agent):
    """A client that promised keepalives and went quiet (dead link, sshd unaware) is dropped."""
    a = make_agent()
    reply, _kid, _ = a.launch(orphan_timeout=0)
    assert reply["ok"], reply
    assert a.request("keepalive", within=1)["ok"]
    assert not a.request("keepalive", within=0)["ok"]
    wait_for(lambda: not pid_alive(reply["pid"]), 10, "the silent client's kernel to stop")
    assert a.proc.wait(10) == 0  # the relay ends when the daemon drops its client


def test_sigterm_to_daemon_stops_everything(agent):
    launched = launch_two_stubborn_kernels(agent)
    os.kill(agent.hello["daemon_pid"], signal.SIGTERM)
    assert agent.proc.wait(15) == 0  # the relay ends with its daemon
    for reply in launched:
        assert not pid_alive(reply["pid"]) and not os.path.exists(reply["dir"])
    wait_for(lambda: daemon_gone(agent), 5, "the daemon to exit")
