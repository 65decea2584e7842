"""The launch op: validate, write the connection file, spawn, wait until it listens, watch."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

from .common import (
    CHANNELS,
    AgentError,
    ensure_base_dir,
    exited,
    from_home,
    killpg,
    log_tail,
    remedy,
)
from .job import address_toward
from .keeper import Keeper
from .keeper import available as can_keep
from .records import write_record
from .table import CLIENTS, EXITED, KERNELS, LOCK, STATE, USED_PORTS, Kernel, release

CURVE_KEYS = ("curve_publickey", "curve_secretkey")  # Z85 text, 40 characters each


def alloc_ports(ip, n=5):
    """n distinct free ports on ip, none already handed to a live kernel."""
    with LOCK:
        socks, ports = [], []
        try:
            while len(socks) < 20 * n and len(ports) < n:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                try:
                    s.bind((ip, 0))
                except OSError as e:
                    raise AgentError(f"cannot listen on {ip}: {e.strerror}") from None
                if s.getsockname()[1] not in USED_PORTS:
                    ports.append(s.getsockname()[1])
        finally:
            for s in socks:
                s.close()
        if len(ports) < n:
            raise AgentError(f"could not find {n} free tcp ports on {ip}")
        USED_PORTS.update(ports)
        return ports


def tcp_listening(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((ip, port))
        return s.getsockname() != s.getpeername()  # a TCP self-connect is not a listener
    except OSError:
        return False
    finally:
        s.close()


def check_launch(req):
    """Validate a launch request; returns (kid, argv, env, conn, transport, cwd, timeout,
    orphan_timeout, output_buffer)."""
    kid, argv, env = req.get("kernel"), req.get("argv"), req.get("env") or {}
    conn, transport = req.get("connection"), req.get("transport", "ipc")
    if not isinstance(kid, str) or not kid:
        raise AgentError("launch needs a kernel id")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise AgentError("launch needs argv as a non-empty list of strings")
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in [*env, *env.values()]):
        raise AgentError("launch needs env as a mapping of strings to strings")
    for name, value in env.items():
        if not name or "=" in name or "\0" in name + value:
            raise AgentError(f"invalid environment variable {name!r}: a name must be non-empty "
                             f"and have no '=', and neither name nor value a NUL byte")  # fmt: skip
    if transport not in ("ipc", "tcp"):
        raise AgentError(f"unknown transport {transport!r}")
    if not isinstance(conn, dict) or not isinstance(conn.get("key"), str):
        raise AgentError("launch needs connection.key")
    curve = [conn.get(name) for name in CURVE_KEYS]
    if any(curve) and not all(isinstance(k, str) and len(k) == 40 for k in curve):
        raise AgentError("connection.curve_publickey and curve_secretkey must be Z85 keys")
    orphan = req.get("orphan_timeout", 0)
    if orphan is not None and (
        isinstance(orphan, bool) or not isinstance(orphan, (int, float)) or orphan < 0
    ):
        raise AgentError("orphan_timeout must be a number of seconds >= 0, or null")
    timeout = req.get("timeout", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise AgentError("launch_timeout must be a number of seconds > 0")
    kept = req.get("output_buffer")
    if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int) or kept < 1):
        raise AgentError("output_buffer must be a number of bytes >= 1")
    cwd = from_home(req.get("cwd") or "~")
    if os.path.exists(cwd) and not os.path.isdir(cwd):
        raise AgentError(f"remote working directory {cwd} is not a directory")
    if req.get("create_cwd") and not os.path.isdir(cwd):
        try:
            os.makedirs(cwd)
        except OSError as e:
            raise AgentError(f"cannot create remote working directory {cwd}: {e.strerror}")
    if not os.path.isdir(cwd):
        raise AgentError(f"remote working directory {cwd} does not exist")
    return kid, argv, env, conn, transport, cwd, float(timeout), orphan, kept


def files_error(e):
    """A kernel's dir or files could not be written (a full /tmp, most often)."""
    return AgentError(f"cannot write a kernel's files in {STATE['base']}: {e.strerror}; "
                      f"{remedy(e)}")  # fmt: skip


def kernel_dir(kid):
    """A new private dir for a kernel in the base dir (re-created if a tmp cleaner took it)."""
    STATE["base"] = ensure_base_dir(STATE["root"])
    safe = re.sub(r"[^A-Za-z0-9_-]", "", kid)[:8] or "kernel"
    try:
        return tempfile.mkdtemp(prefix=safe + "-", dir=STATE["base"])
    except OSError as e:
        raise files_error(e) from None


def write_connection_file(kdir, info):
    cfile = os.path.join(kdir, "connection.json")
    try:
        with os.fdopen(os.open(cfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(info, f)
    except OSError as e:
        raise files_error(e) from None
    return cfile


def tcp_address(client):
    """Where a tcp kernel listens: loopback; in a Slurm job, the node's address toward the
    login node its client's srun came from (see job.py)."""
    if not STATE.get("job"):
        return "127.0.0.1"
    return address_toward(client.env.get("SLURM_LAUNCH_NODE_IPADDR"))


def spawn(client, kid, argv, env, conn, transport, cwd, orphan, kept):
    """Make the kernel dir and connection file, start the kernel and its iopub keeper, write
    its record (so that a later daemon can find it); returns (Kernel, the kernel's own
    endpoints)."""
    kdir, ports, k = kernel_dir(kid), [], None
    try:
        if transport == "ipc":
            ip, by_channel = os.path.join(kdir, "k"), dict(zip(CHANNELS, range(1, 6)))
            endpoints = {ch: f"{ip}-{p}" for ch, p in by_channel.items()}
            if len(endpoints["shell"]) > 100:  # AF_UNIX paths are limited to ~107 bytes
                raise AgentError(f"ipc socket path {endpoints['shell']} is too long")
            keep_at = f"{ip}-kept" if can_keep() else None
        else:
            ip = tcp_address(client)
            ports = alloc_ports(ip, 6 if can_keep() else 5)
            by_channel = endpoints = dict(zip(CHANNELS, ports))
            keep_at = ports[5] if can_keep() else None
        info = {f"{ch}_port": p for ch, p in by_channel.items()}
        info.update(ip=ip, transport=transport, key=conn["key"])
        info.update(signature_scheme=conn.get("signature_scheme", "hmac-sha256"))
        info.update(kernel_name=conn.get("kernel_name", ""))
        info.update((name, conn[name]) for name in CURVE_KEYS if conn.get(name))
        cfile = write_connection_file(kdir, info)
        cmd = [a.replace("{connection_file}", cfile) for a in argv]
        full_env = dict(STATE.get("kernel_env") or client.env, **env)
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
                k = KERNELS[kid] = Kernel(kid, proc, kdir, ports, client, orphan)
                k.kernel_name = str(conn.get("kernel_name") or "")
                k.endpoints, k.ip = endpoints, ip if transport == "tcp" else None
                if client not in CLIENTS:  # the client left while we were preparing
                    k.orphaned_at = time.monotonic()
                    k.clients.clear()
        finally:
            os.close(log_fd)
        if keep_at is not None:
            start_keeper(k, keep_at, conn, kept)
        try:
            write_record(k)
        except OSError as e:
            raise files_error(e) from None
    except BaseException:
        if k is not None:  # started, but it could not be recorded: it must not run unseen
            kill_unstarted(k)
        with LOCK:
            USED_PORTS.difference_update(ports)
        shutil.rmtree(kdir, ignore_errors=True)
        raise
    return k, endpoints


def url(ip, endpoint):
    """A zmq address: a Unix socket path, or a tcp port on ip."""
    return f"tcp://{ip}:{endpoint}" if isinstance(endpoint, int) else f"ipc://{endpoint}"


def start_keeper(k, keep_at, conn, kept):
    """Put a keeper (keeper.py) in front of the kernel: its clients link to ``keep_at``."""
    kernel = {ch: url(k.ip, k.endpoints[ch]) for ch in ("shell", "iopub", "stdin", "control")}
    keys = {name: conn[name] for name in CURVE_KEYS if conn.get(name)}
    keeper = Keeper(kernel, url(k.ip, keep_at), keys, kept, k.activity)
    try:
        keeper.start()
    except Exception as e:  # noqa: BLE001 - zmq's errors: the kernel must not run unseen
        raise AgentError(f"cannot start the kernel's keeper at {keep_at}: {e}") from None
    k.keeper, k.keeper_at, k.output_buffer = keeper, keep_at, kept


def kill_unstarted(k):
    """Kill a kernel whose start failed (its group too), reap it, forget it."""
    if k.keeper is not None:
        k.keeper.close()
    killpg(k.pgid, signal.SIGKILL)
    k.status = k.proc.wait()
    release(k)
    k.done.set()


def abort_start(k, message, with_status):
    """Kill what is left of a kernel that failed to start, clean up, raise the error reply."""
    kill_unstarted(k)
    status, extra = k.status, {"log_tail": log_tail(k.dir)}
    shutil.rmtree(k.dir, ignore_errors=True)
    if with_status:
        message, extra["status"] = message % status, status
    raise AgentError(message, **extra)


def session_tag(req):
    """The (notebook path, owner) a launch request (or a record) tags its kernel with, so
    that the same user's Jupyter can reclaim it for the same notebook (op_claim); None."""
    tag = req.get("tag")
    if isinstance(tag, (list, tuple)) and len(tag) == 2 and all(isinstance(t, str) for t in tag):
        return tuple(tag)
    return None


def op_launch(client, req):
    """Start a kernel detached, wait until it listens, reply; a watcher reports its exit."""
    kid, argv, env, conn, transport, cwd, timeout, orphan, kept = check_launch(req)
    k, endpoints = spawn(client, kid, argv, env, conn, transport, cwd, orphan, kept)
    k.tag = session_tag(req)
    deadline = time.monotonic() + timeout
    pending = list(endpoints.values())
    ip = k.ip

    def ready(endpoint):
        return os.path.exists(endpoint) if ip is None else tcp_listening(ip, endpoint)

    while True:
        if exited(k.proc):
            abort_start(k, "kernel exited with status %d during start", True)
        pending = [p for p in pending if not ready(p)]
        if not pending and (k.keeper is None or k.keeper.ready.is_set()):
            break
        if time.monotonic() >= deadline:
            abort_start(k, f"kernel did not start listening within {timeout:g} s", False)
        time.sleep(0.01)
    k.ready = True
    with contextlib.suppress(OSError):  # kept unready, a later daemon would stop it
        write_record(k)
    threading.Thread(target=watch, args=(k,), daemon=True).start()
    reply = {"re": req.get("id"), "ok": True, "pid": k.proc.pid, "pgid": k.pgid, "dir": k.dir}
    client.emit(dict(reply, endpoints=k.endpoints, ip=ip, keeper=k.keeper_at))
    k.announced.set()  # the reply is written here so the exited event can never precede it


def watch(k):
    """Wait for a kernel to exit, kill its leftovers, remove its files, report the exit to
    the clients holding it and remember it for a while."""
    exited(k.proc, block=True)
    if k.keeper is not None:
        k.keeper.close()  # at once: a restart may start the next kernel under this id
    killpg(k.pgid, signal.SIGKILL)  # children the kernel left behind in its group
    k.status = status = k.proc.wait()
    tail = log_tail(k.dir) if status != 0 else ""
    shutil.rmtree(k.dir, ignore_errors=True)
    with LOCK:
        EXITED[k.kid] = (time.monotonic(), status, tail)
        release(k)
    k.announced.wait(10.0)
    with LOCK:
        clients = list(k.clients)
    for client in clients:
        client.emit({"event": "exited", "kernel": k.kid, "status": status, "log_tail": tail})
    k.done.set()  # the daemon's reaper notices when it was the last one
