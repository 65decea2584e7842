"""The relay: the exec channel's end, copying bytes between the channel and the daemon."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .common import (
    START_TIMEOUT,
    AgentError,
    base_lock,
    base_root,
    daemon_files,
    ensure_base_dir,
    file_tail,
    one_line,
)
from .job import job_id, job_root

RELAY_DRAIN = 15.0  # seconds the relay waits for the daemon after the channel closed
DAEMON_BOOTSTRAP = (
    'import sys;s=sys.stdin.buffer.read();exec(compile(s,"jrp-agent","exec"),'
    '{"__name__":"__main__","AGENT_SOURCE":s,"AGENT_MODE":"daemon"})'
)
OUT_LOCK = threading.RLock()  # the relay's stdout: one line at a time


def emit(obj):
    """Relay only: write one JSON line of its own (the fatal event) to stdout."""
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")
    with OUT_LOCK, contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def exit_now(code):
    """Exit without interpreter teardown (daemon threads may hold stdout's buffer lock)."""
    if OUT_LOCK.acquire(timeout=1.0):
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.buffer.flush()
    os._exit(code)


def connect(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(START_TIMEOUT)
    try:
        s.connect(name)
        return s
    except OSError:
        s.close()
        return None


def start_daemon(bundle, root, sock_name, log_name):
    """Start the daemon detached with our base dir's root, feed it the bundle; return a
    socket connected to it."""
    log_fd = os.open(log_name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", DAEMON_BOOTSTRAP, root], stdin=subprocess.PIPE, stdout=log_fd,
            stderr=log_fd, start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it exits
    with contextlib.suppress(OSError):
        proc.stdin.write(bundle)
    with contextlib.suppress(OSError):
        proc.stdin.close()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        s = connect(sock_name)
        if s is not None:
            return s
        status = proc.poll()
        if status is not None or time.monotonic() > deadline:
            why = f"exited with status {status}" if status is not None else "did not listen"
            tail = " | ".join(file_tail(log_name, lines=5).splitlines())
            raise AgentError(f"the agent daemon {why}: {tail or 'no output'}")
        time.sleep(0.01)


def wait_for_daemon(sock_name):
    """A Slurm job's daemon (its batch script) may not listen yet when the job is RUNNING."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        s = connect(sock_name)
        if s is not None:
            return s
        if time.monotonic() > deadline:
            raise AgentError(f"no agent runs in Slurm job {job_id()} on this node (the job "
                             f"has ended, or its batch script failed)")  # fmt: skip
        time.sleep(0.02)


def open_daemon(bundle, root, in_job=False):
    """Connect to the daemon (starting it if needed, unless ``in_job``: the job's batch
    script is the daemon); returns (socket, bytes up to its hello).

    A daemon that is exiting closes the connection before its hello: then start over."""
    sock_name, lock_name, log_name = daemon_files()
    for _ in range(5):
        s = wait_for_daemon(sock_name) if in_job else connect(sock_name)
        if s is None:
            with base_lock(lock_name, START_TIMEOUT + 5.0):
                s = connect(sock_name) or start_daemon(bundle, root, sock_name, log_name)
        data = b""
        with contextlib.suppress(OSError):
            while b"\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        if b"\n" in data:
            s.settimeout(None)
            return s, data
        s.close()
    raise AgentError("the agent daemon closed every connection before its hello")


def relay_main(bundle, in_job=False):
    """Connect the channel to the daemon (of this Slurm job when ``in_job``) and copy bytes
    both ways until either side ends."""
    try:
        root = job_root() if in_job else base_root()
        ensure_base_dir(root)
        os.chdir(ensure_base_dir(root, "-agent"))
        sock, first = open_daemon(bundle, root, in_job)
    except (AgentError, OSError) as e:
        emit({"event": "fatal", "error": one_line(e)})
        sys.stderr.write(one_line(e) + "\n")
        exit_now(1)
    env = {"relay": {"pid": os.getpid(), "env": dict(os.environ)}}
    sock.sendall(json.dumps(env, separators=(",", ":")).encode("ascii") + b"\n")
    channel_closed = threading.Event()

    def close_channel(*_):
        """Channel gone (stdin EOF, SIGTERM/SIGHUP): the daemon decides, then closes."""
        channel_closed.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    def pump_stdin():
        stdin = sys.stdin.buffer  # the bootstrap may have buffered the first requests
        while True:
            try:
                data = stdin.read1(65536)
                if not data:
                    break
                sock.sendall(data)
            except (OSError, ValueError):
                break
        close_channel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, close_channel)
    threading.Thread(target=pump_stdin, daemon=True).start()
    out = sys.stdout.buffer
    sock.settimeout(1.0)
    drained = None
    while first:
        try:
            out.write(first)
            out.flush()
        except (OSError, ValueError):
            close_channel()  # nobody reads the channel any more
        while True:
            if channel_closed.is_set():
                drained = drained or time.monotonic() + RELAY_DRAIN
                if time.monotonic() > drained:
                    first = b""
                    break
            try:
                first = sock.recv(65536)
                break
            except socket.timeout:  # noqa: UP041 - not TimeoutError before 3.10
                continue
            except OSError:
                first = b""
                break
    exit_now(0)
