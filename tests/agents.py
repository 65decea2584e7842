"""Driving the remote agent locally exactly as the provisioner runs it over SSH (the real
bootstrap command, a relay that starts or joins the daemon), for the agent tests."""

import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient

from jupyter_remote_provisioner.agent import agent_source
from jupyter_remote_provisioner.remote.common import PROTOCOL

from sshd import pid_alive

AGENT_SOURCE = agent_source()
BOOTSTRAP = (
    "import sys;n=int(sys.stdin.buffer.readline());s=sys.stdin.buffer.read(n);"
    'exec(compile(s,"jrp-agent","exec"),{"__name__":"__main__","AGENT_SOURCE":s,'
    '"AGENT_MODE":"relay"})'
)


def bootstrap_command(python):
    """The exec command the local side sends over SSH."""
    return f"exec {shlex.quote(python)} -c {shlex.quote(BOOTSTRAP)}"


IPYKERNEL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
TIMEOUT = 30.0


def processes_with_tmpdir(tmpdir):
    """Pids of live processes whose environment has TMPDIR=tmpdir (relays, daemons, kernels)."""
    mark = f"TMPDIR={tmpdir}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if mark in environ and pid_alive(int(pid)):
                found.append(int(pid))
    return found


class Agent:
    """Runs the agent via the real bootstrap command (a relay, which connects to or starts
    the daemon) and speaks its JSON-lines protocol."""

    def __init__(self, python=sys.executable, env=None):
        self.env = env
        cmd = ["sh", "-c", bootstrap_command(python)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
        )
        self.cond = threading.Condition()
        self.replies, self.events, self.eof = {}, [], False
        self.next_id, self.write_lock = 0, threading.Lock()
        self.pgids, self.dirs = [], []  # everything launched, for cleanup
        threading.Thread(target=self._reader, daemon=True).start()
        self.proc.stdin.write(b"%d\n" % len(AGENT_SOURCE) + AGENT_SOURCE)
        self.proc.stdin.flush()
        self.hello = self.wait_event(lambda e: e["event"] in ("hello", "fatal"))

    def _reader(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "re" in msg:
                    self.replies[msg["re"]] = msg
                else:
                    self.events.append(msg)
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def _wait(self, find, timeout, what):
        box = []

        def check():  # find() consumes what it finds, so keep it
            box.append(find())
            return box[-1] or self.eof

        with self.cond:
            self.cond.wait_for(check, timeout)
        found = box[-1] if box else None
        if not found:
            pytest.fail(f"no {what} from agent within {timeout}s (eof={self.eof})")
        return found

    def send_raw(self, data):
        with self.write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def send(self, op, **fields):
        with self.write_lock:
            self.next_id += 1
            rid = self.next_id
        self.send_raw((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
        return rid

    def wait_reply(self, rid, timeout=TIMEOUT):
        reply = self._wait(lambda: self.replies.pop(rid, None), timeout, f"reply to {rid}")
        if reply.get("ok") and "dir" in reply:
            self.pgids.append(reply["pgid"])
            self.dirs.append(reply["dir"])
        return reply

    def request(self, op, timeout=TIMEOUT, **fields):
        return self.wait_reply(self.send(op, **fields), timeout)

    def wait_event(self, pred, timeout=TIMEOUT):
        def find():
            for i, e in enumerate(self.events):
                if pred(e):
                    return self.events.pop(i)
            return None

        return self._wait(find, timeout, "matching event")

    def launch(self, argv=IPYKERNEL_ARGV, transport="ipc", timeout=TIMEOUT, **fields):
        """Launch a kernel with a fresh id and key; returns (reply, kernel id, key)."""
        kid, key = str(uuid.uuid4()), uuid.uuid4().hex
        conn = {"key": key, "signature_scheme": "hmac-sha256", "kernel_name": "python3"}
        fields = {"env": {}, "cwd": None, **fields}
        rid = self.send(
            "launch", kernel=kid, argv=argv, connection=conn, transport=transport,
            timeout=timeout, **fields,
        )  # fmt: skip
        return self.wait_reply(rid, timeout + 10), kid, key

    def close(self, timeout=15.0):
        """Close stdin (EOF), wait for exit; returns the exit status."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        return self.proc.wait(timeout)

    def socket_path(self):
        return os.path.join(
            self.hello["base"] + "-agent", f"agent-{sha12(sys.executable)}-v{PROTOCOL}.sock"
        )

    def destroy(self):
        """Best-effort cleanup after a test, even a failed one: relay, daemon, kernels."""
        with contextlib.suppress(Exception):
            self.close(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.hello.get("daemon_pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.hello["daemon_pid"], signal.SIGKILL)
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def sha12(text):
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.fixture
def rtmp():
    """A private TMPDIR for this test's agents, short enough for ipc socket paths (pytest's
    tmp_path is not: AF_UNIX paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="jrp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_agent(rtmp):
    """Start relays whose TMPDIR is this test's own, so daemons of tests never meet;
    afterwards kill every relay, daemon and kernel of that TMPDIR that is still there."""
    agents = []

    def make(**kw):
        kw.setdefault("env", dict(os.environ, TMPDIR=str(rtmp)))
        agents.append(Agent(**kw))
        return agents[-1]

    yield make
    for a in agents:
        a.destroy()
    for pid in processes_with_tmpdir(rtmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def agent(make_agent):
    a = make_agent()
    assert a.hello["event"] == "hello", a.hello
    return a


@contextlib.contextmanager
def kernel_client(reply, key, transport):
    """A BlockingKernelClient connected to the endpoints in a launch reply."""
    ep = reply["endpoints"]
    info = {"transport": transport, "key": key, "signature_scheme": "hmac-sha256"}
    if transport == "ipc":
        info["ip"] = ep["shell"][: -len("-1")]
        info.update({f"{ch}_port": int(ep[ch].rsplit("-", 1)[1]) for ch in CHANNELS})
    else:
        info["ip"] = "127.0.0.1"
        info.update({f"{ch}_port": ep[ch] for ch in CHANNELS})
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        yield kc
    finally:
        kc.stop_channels()


def run(kc, code, timeout=TIMEOUT):
    """Execute code; returns (execute reply content, captured stdout)."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)


def wait_stdout(kc, msg_id, text, timeout=TIMEOUT):
    """Read iopub until the cell msg_id prints text (used to know the cell is running)."""
    deadline = time.monotonic() + timeout
    seen = ""
    while text not in seen:
        msg = kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    return seen


def kernel_dirs(agent, kid):
    return glob.glob(os.path.join(agent.hello["base"], kid[:8] + "-*"))


def daemon_gone(agent):
    """The agent's daemon has exited and removed its socket."""
    return not pid_alive(agent.hello["daemon_pid"]) and not os.path.exists(agent.socket_path())


def is_exited(event):
    return event["event"] == "exited"
