"""Remote agent: launches Jupyter kernels on the remote host for the provisioner.

The local side feeds this file to `python3 -c` over one SSH exec channel (length line, then
the source), then speaks JSON lines on the same stdin/stdout: requests {"id", "op", ...},
replies {"re", "ok", ...}, events {"event", ...}. Stdlib-only, ASCII, Python >= 3.6: it runs on
whatever python3 the remote host has. Each request gets a thread, so a launch never delays a
signal; one agent serves many kernels.
"""

import contextlib
import getpass
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

PROTOCOL = 1
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
SHUTDOWN_GRACE = 3.0  # seconds kernels get to exit on SIGTERM when the channel closes

OUT_LOCK = threading.RLock()  # one stdout line at a time (RLock: signal handler may re-enter)
LOCK = threading.RLock()  # guards KERNELS, USED_PORTS and STATE
KERNELS = {}  # type: dict  # kernel id (as given) -> Kernel, from spawn until exit is handled
USED_PORTS = set()  # type: set  # tcp ports handed to kernels that are still alive
STATE = {"closing": False, "base": None}


class AgentError(Exception):
    """A request failed: the message is the reply's one-line error, extra goes into the reply."""

    def __init__(self, message, **extra):
        Exception.__init__(self, message)
        self.extra = extra


class Kernel:
    """One spawned kernel process and the directory and ports it owns."""

    def __init__(self, kid, proc, kdir, ports):
        self.kid, self.proc, self.dir, self.ports = kid, proc, kdir, ports
        self.pgid = proc.pid  # start_new_session=True makes the kernel its group leader
        self.started = time.time()
        self.ready = False
        self.announced = threading.Event()  # set once the launch reply is written


def one_line(text):
    return " ".join(str(text).split()) or "unknown error"


def emit(obj):
    """Write one JSON line to stdout; a closed channel is ignored (cleanup handles it)."""
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


def killpg(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def exited(proc, block=False):
    """Has proc exited (block: wait until it has)? Leaves it unreaped where the OS allows,
    so its pid stays its group's id and a later killpg cannot hit a recycled pid."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):
        return (proc.wait() if block else proc.poll()) is not None
    try:
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        return os.waitid(os.P_PID, proc.pid, flags) is not None
    except ChildProcessError:
        return True


def log_tail(kdir, lines=20, limit=4000):
    """Last lines of the kernel's combined stdout/stderr, for error reports."""
    try:
        with open(os.path.join(kdir, "kernel.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-limit:]


def ipykernel_version():
    """Installed ipykernel version without importing it (slow); None if it is absent."""
    try:
        from importlib import metadata

        return metadata.version("ipykernel")
    except Exception:  # noqa: BLE001 - no importlib.metadata (< 3.8) or no dist-info
        import importlib.util

        return "unknown" if importlib.util.find_spec("ipykernel") else None


def user_name():
    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):  # no passwd entry for our uid
        return str(os.getuid())


def ensure_base_dir():
    """Create or validate <tmp>/jupyter-remote-<uid>: a private real directory owned by us."""
    uid = os.getuid()
    base = os.path.join(tempfile.gettempdir(), f"jupyter-remote-{uid}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise AgentError(f"cannot create {base}: {e.strerror}") from None
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError(f"{base} is not a directory (or is a symlink)")
    if st.st_uid != uid:
        raise AgentError(f"{base} is owned by uid {st.st_uid}, not {uid}")
    if st.st_mode & 0o077:
        raise AgentError(f"{base} is open to other users (mode {st.st_mode & 0o777:o})")
    return base


def alloc_ports(n=5):
    """n distinct free localhost ports, none already handed to a live kernel."""
    with LOCK:
        socks, ports = [], []
        try:
            while len(socks) < 20 * n and len(ports) < n:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", 0))
                if s.getsockname()[1] not in USED_PORTS:
                    ports.append(s.getsockname()[1])
        finally:
            for s in socks:
                s.close()
        if len(ports) < n:
            raise AgentError(f"could not find {n} free tcp ports on 127.0.0.1")
        USED_PORTS.update(ports)
        return ports


def release(k):
    """Forget a kernel and give back its ports (the caller removes its files)."""
    with LOCK:
        USED_PORTS.difference_update(k.ports)
        if KERNELS.get(k.kid) is k:
            del KERNELS[k.kid]


def tcp_listening(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(("127.0.0.1", port))
        return s.getsockname() != s.getpeername()  # a TCP self-connect is not a listener
    except OSError:
        return False
    finally:
        s.close()


def check_launch(req):
    """Validate a launch request; returns (kid, argv, env, conn, transport, cwd, timeout)."""
    kid, argv, env = req.get("kernel"), req.get("argv"), req.get("env") or {}
    conn, transport = req.get("connection"), req.get("transport", "ipc")
    if not isinstance(kid, str) or not kid:
        raise AgentError("launch needs a kernel id")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise AgentError("launch needs argv as a non-empty list of strings")
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in [*env, *env.values()]):
        raise AgentError("launch needs env as a mapping of strings to strings")
    if transport not in ("ipc", "tcp"):
        raise AgentError(f"unknown transport {transport!r}")
    if not isinstance(conn, dict) or not isinstance(conn.get("key"), str):
        raise AgentError("launch needs connection.key")
    cwd = os.path.expanduser(req.get("cwd") or "~")
    if not os.path.isdir(cwd):
        raise AgentError(f"remote working directory {cwd} does not exist")
    return kid, argv, env, conn, transport, cwd, float(req.get("timeout") or 60.0)


def spawn(kid, argv, env, conn, transport, cwd):
    """Make the kernel dir and connection file, start the kernel; returns (Kernel, endpoints)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "", kid)[:8] or "kernel"
    kdir = tempfile.mkdtemp(prefix=safe + "-", dir=STATE["base"])
    ports = []
    try:
        if transport == "ipc":
            ip, by_channel = os.path.join(kdir, "k"), dict(zip(CHANNELS, range(1, 6)))
            endpoints = {ch: f"{ip}-{p}" for ch, p in by_channel.items()}
            if len(endpoints["shell"]) > 100:  # AF_UNIX paths are limited to ~107 bytes
                raise AgentError(f"ipc socket path {endpoints['shell']} is too long")
        else:
            ip, ports = "127.0.0.1", alloc_ports()
            by_channel = endpoints = dict(zip(CHANNELS, ports))
        info = {f"{ch}_port": p for ch, p in by_channel.items()}
        info.update(ip=ip, transport=transport, key=conn["key"])
        info.update(signature_scheme=conn.get("signature_scheme", "hmac-sha256"))
        info.update(kernel_name=conn.get("kernel_name", ""))
        cfile = os.path.join(kdir, "connection.json")
        with os.fdopen(os.open(cfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(info, f)
        cmd = [a.replace("{connection_file}", cfile) for a in argv]
        full_env = dict(os.environ, **env)
        log_fd = os.open(os.path.join(kdir, "kernel.log"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with LOCK:  # spawn + register atomically with respect to shutdown's snapshot
                if STATE["closing"]:
                    raise AgentError("agent is shutting down")
                if kid in KERNELS:
                    raise AgentError(f"kernel {kid} is already running on this host")
                try:
                    proc = subprocess.Popen(
                        cmd, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=log_fd,
                        stderr=log_fd, start_new_session=True, close_fds=True,
                    )  # fmt: skip
                except OSError as e:
                    raise AgentError(f"cannot run {argv[0]}: {e.strerror or e}") from None
                k = KERNELS[kid] = Kernel(kid, proc, kdir, ports)
        finally:
            os.close(log_fd)
    except BaseException:
        with LOCK:
            USED_PORTS.difference_update(ports)
        shutil.rmtree(kdir, ignore_errors=True)
        raise
    return k, endpoints


def abort_start(k, message, with_status):
    """Kill what is left of a kernel that failed to start, clean up, raise the error reply."""
    killpg(k.pgid, signal.SIGKILL)
    status = k.proc.wait()
    extra = {"log_tail": log_tail(k.dir)}
    shutil.rmtree(k.dir, ignore_errors=True)
    release(k)
    if with_status:
        message, extra["status"] = message % status, status
    raise AgentError(message, **extra)


def op_launch(req):
    """Start a kernel detached, wait until it listens, reply; a watcher reports its exit."""
    kid, argv, env, conn, transport, cwd, timeout = check_launch(req)
    k, endpoints = spawn(kid, argv, env, conn, transport, cwd)
    deadline = time.monotonic() + timeout
    pending = list(endpoints.values())
    ready = os.path.exists if transport == "ipc" else tcp_listening
    while True:
        if exited(k.proc):
            abort_start(k, "kernel exited with status %d during start", True)
        pending = [p for p in pending if not ready(p)]
        if not pending:
            break
        if time.monotonic() >= deadline:
            abort_start(k, f"kernel did not start listening within {timeout:g} s", False)
        time.sleep(0.01)
    k.ready = True
    threading.Thread(target=watch, args=(k,), daemon=True).start()
    reply = {"re": req.get("id"), "ok": True, "pid": k.proc.pid, "pgid": k.pgid, "dir": k.dir}
    emit(dict(reply, endpoints=endpoints))
    k.announced.set()  # the reply is written here so the exited event can never precede it


def watch(k):
    """Wait for a kernel to exit, kill its leftovers, remove its files, report the exit."""
    exited(k.proc, block=True)
    killpg(k.pgid, signal.SIGKILL)  # children the kernel left behind in its group
    status = k.proc.wait()
    tail = log_tail(k.dir) if status != 0 else ""
    shutil.rmtree(k.dir, ignore_errors=True)
    release(k)
    k.announced.wait(10.0)
    emit({"event": "exited", "kernel": k.kid, "status": status, "log_tail": tail})


def op_signal(req):
    kid, signum = req.get("kernel"), req.get("signum")
    with LOCK:
        k = KERNELS.get(kid) if isinstance(kid, str) else None
    if k is None:
        raise AgentError(f"no kernel {kid} on this host")
    if not isinstance(signum, int) or isinstance(signum, bool):
        raise AgentError("signal needs an integer signum")
    try:
        os.killpg(k.pgid, signum)
    except ProcessLookupError:
        return {"gone": True}
    except (OSError, ValueError) as e:
        raise AgentError(f"cannot send signal {signum} to kernel {kid}: {e}") from None
    return {}


def op_list(req):
    with LOCK:
        ks = [k for k in KERNELS.values() if k.ready]
    info = [{"kernel": k.kid, "pid": k.proc.pid, "dir": k.dir, "started": k.started} for k in ks]
    return {"kernels": info}


def op_ping(req):
    return {"time": time.time()}


OPS = {"launch": op_launch, "signal": op_signal, "list": op_list, "ping": op_ping}


def handle(req):
    """Run one request (in its own thread) and write its reply; never raises."""
    reply = {"re": req["id"], "ok": True}
    try:
        op = OPS.get(req.get("op"))
        if op is None:
            raise AgentError(f"unknown op {req.get('op')!r}")
        result = op(req)
        if result is None:
            return  # the op wrote its own reply
        reply.update(result)
    except AgentError as e:
        reply.update(ok=False, error=one_line(e), **e.extra)
    except Exception as e:  # noqa: BLE001 - any bug becomes an error reply, never a crash
        reply.update(ok=False, error=one_line(f"{req.get('op')} failed: {type(e).__name__}: {e}"))
    emit(reply)


def dispatch(line):
    """Parse one protocol line and start a thread for it."""
    try:
        req = json.loads(line.decode("utf-8"))
    except ValueError as e:  # the line itself is not echoed: it may contain the session key
        emit({"event": "log", "level": "warning", "message": one_line(f"bad line: {e}")})
        return
    if not isinstance(req, dict) or not isinstance(req.get("id"), int):
        emit({"event": "log", "level": "warning", "message": "request without an integer id"})
        return
    threading.Thread(target=handle, args=(req,), daemon=True).start()


def terminate_kernels(kernels, grace):
    """SIGTERM each kernel's group, wait up to grace s, SIGKILL what is left, remove dirs."""
    for k in kernels:
        killpg(k.pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(exited(k.proc) for k in kernels):
        time.sleep(0.02)
    for k in kernels:
        killpg(k.pgid, signal.SIGKILL)  # stragglers and any children they left
        shutil.rmtree(k.dir, ignore_errors=True)


def on_channel_closed():
    """The SSH channel is gone (stdin EOF, or SIGTERM/SIGHUP): decide the kernels' fate.

    Protocol 1 stops every kernel now; a later version may keep them for an orphan timeout.
    Returns False if this already ran.
    """
    with LOCK:
        if STATE["closing"]:
            return False
        STATE["closing"] = True
        kernels = list(KERNELS.values())
    terminate_kernels(kernels, SHUTDOWN_GRACE)
    return True


def on_signal(signum, frame):
    if on_channel_closed():  # runs in the main thread, interrupting its stdin read
        exit_now(0)


def main():
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        STATE["base"] = ensure_base_dir()
    except (AgentError, OSError) as e:
        emit({"event": "fatal", "error": one_line(e)})
        exit_now(1)
    hello = {"event": "hello", "protocol": PROTOCOL, "pid": os.getpid()}
    hello.update(
        executable=sys.executable, python=platform.python_version(), ipykernel=ipykernel_version()
    )
    hello.update(home=os.path.expanduser("~"), user=user_name(), base=STATE["base"])
    emit(hello)
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            break
        if line.strip():
            dispatch(line)
    on_channel_closed()
    exit_now(0)


if __name__ == "__main__":
    main()
