"""Every other op (signal, attach, stop, list, ping) and the dispatch of request lines."""

import json
import os
import socket
import threading
import time

from .adopt import adopt_orphans
from .common import AgentError, one_line
from .job import SESSION_PID
from .launch import CURVE_KEYS, op_launch
from .table import CLIENTS, EXITED, KERNELS, LOCK, STOP_GRACE, terminate_kernels


def find_kernel(kid, ready=True):
    """The live kernel kid, or the reply error (with its status if it exited recently)."""
    for attempt in (1, 2):
        with LOCK:
            k = KERNELS.get(kid) if isinstance(kid, str) else None
            if k is not None and (k.ready or not ready):
                return k
            gone = EXITED.get(kid) if isinstance(kid, str) else None
        if gone or attempt == 2:
            break
        adopt_orphans()  # maybe a kernel of a daemon that died
    extra = {"exited": gone[1], "log_tail": gone[2]} if gone else {}
    raise AgentError(f"no kernel {kid} on this host", **extra)


def op_signal(client, req):
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


def op_attach(client, req):
    """Hold the kernel too (so it is no orphan, and this client gets its exited event); reply
    its endpoints and its connection settings (key included: the client may have none)."""
    return hold(client, find_kernel(req.get("kernel")), req.get("replaces"))


def op_claim(client, req):
    """Hold the newest kernel tagged with this notebook and owner (launch's ``tag``), from
    this kernelspec, that no client holds: a Jupyter server restarted reopening the notebook.
    One held by a client (the notebook open elsewhere) is never shared. Reply as attach, or
    {"kernel": None, "held": how many such kernels are held}."""
    tag = tuple(req.get("tag") or ())
    with LOCK:
        mine = [
            k for k in KERNELS.values()
            if k.ready and not k.stopping and k.tag == tag
            and k.kernel_name == req.get("kernel_name")
        ]  # fmt: skip
        free = sorted((k for k in mine if not k.clients), key=lambda k: k.started)
        if not free:
            return {"kernel": None, "held": len(mine)}
        k = free[-1]
        k.clients.add(client)  # ours now: no other claim takes it
    return dict(hold(client, k, None), kernel=k.kid)


def hold(client, k, replaces):
    """Make ``client`` a holder of k (retiring the connection it replaces); the attach reply."""
    with LOCK:
        if k.stopping or KERNELS.get(k.kid) is not k:
            k.clients.discard(client)
            raise AgentError(f"kernel {k.kid} is being stopped")
        k.clients.add(client)
        k.orphaned_at = None
        stale = [c for c in CLIENTS if c.id == replaces and c is not client]
    for old in stale:  # the connection the caller lost, still open on this side
        old.retire()
    try:
        with open(os.path.join(k.dir, "connection.json")) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise AgentError(f"cannot read the connection file of kernel {k.kid}: {e}") from None
    names = ("key", "signature_scheme", "kernel_name") + CURVE_KEYS
    connection = {name: info.get(name) for name in names if name in info}
    reply = {"pid": k.proc.pid, "pgid": k.pgid, "dir": k.dir, "endpoints": k.endpoints}
    reply.update(ip=k.ip, keeper=k.keeper_at if k.keeper is not None else None)
    # through srun, the sshd sessions that hold stale forwards are on the login node (see
    # job.py): the client ends them there
    with LOCK:
        sessions, k.stale_sessions = k.stale_sessions, set()
    sessions.update(c.env[SESSION_PID] for c in stale if SESSION_PID in c.env)
    reply["stale_sessions"] = sorted(sessions)
    return dict(reply, orphan_timeout=k.orphan_timeout, connection=connection)


def op_stop(client, req):
    """SIGTERM the kernel's group, SIGKILL after STOP_GRACE; reply once its exit is handled."""
    k = find_kernel(req.get("kernel"), ready=False)
    with LOCK:
        k.stopping = True
    terminate_kernels([k], STOP_GRACE)
    if not k.done.wait(STOP_GRACE + 5.0):
        raise AgentError(f"kernel {k.kid} did not exit")
    return {"status": k.status}


def host_id():
    """What tells this machine from others: its machine id (shared by clones of one image,
    hence with the host name), else the host name. A client that reaches the host under
    several names (an alias, an address) sees by it that the kernels listed are the same."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                ident = f.read().strip()
        except OSError:
            continue
        if ident:
            return ident + "/" + socket.gethostname()
    return socket.gethostname()


def since(when):
    """Seconds since a wall-clock time of this host (None stays None): the client's clock
    may differ from ours."""
    return None if when is None else round(max(0.0, time.time() - when), 3)


def op_list(client, req):
    """Every kernel of the daemon, whoever holds it, and which host this is."""
    adopt_orphans()
    now, info = time.monotonic(), []
    with LOCK:
        for k in KERNELS.values():
            if k.ready:
                orphaned = None if k.orphaned_at is None else round(now - k.orphaned_at, 3)
                act = k.activity
                info.append(
                    {"kernel": k.kid, "kernel_name": k.kernel_name,
                     "pid": k.proc.pid, "dir": k.dir, "started": k.started,
                     "attached": len(k.clients), "orphan_timeout": k.orphan_timeout,
                     "orphaned_for": orphaned, "busy": act.busy if act.state else None,
                     "state": act.state, "state_for": since(act.since),
                     "quiet_for": since(act.last),
                     "kept": k.keeper.stats() if k.keeper else None}
                )  # fmt: skip
    return {"kernels": info, "host_id": host_id()}


def op_keepalive(client, req):
    """The client promises a line at least every `within` seconds; silence longer than that
    disconnects it (see daemon.drop_silent_clients)."""
    within = req.get("within")
    if isinstance(within, bool) or not isinstance(within, (int, float)) or within <= 0:
        raise AgentError("keepalive needs `within`, a number of seconds > 0")
    client.silence_limit = float(within)
    return {}


def op_launch_new(client, req):
    """Launch, after adopting any kernel of a dead daemon: one under this id is not started
    twice (its client may have taken it for dead)."""
    adopt_orphans()
    return op_launch(client, req)


def op_ping(client, req):
    return {"time": time.time()}


OPS = {"launch": op_launch_new, "signal": op_signal, "list": op_list, "ping": op_ping}
OPS.update(attach=op_attach, stop=op_stop, keepalive=op_keepalive, claim=op_claim)


def handle(client, req):
    """Run one request (in its own thread) and write its reply; never raises."""
    reply = {"re": req["id"], "ok": True}
    try:
        op = OPS.get(req.get("op"))
        if op is None:
            raise AgentError(f"unknown op {req.get('op')!r}")
        result = op(client, req)
        if result is None:
            return  # the op wrote its own reply
        reply.update(result)
    except AgentError as e:
        reply.update(ok=False, error=one_line(e), **e.extra)
    except Exception as e:  # noqa: BLE001 - any bug becomes an error reply, never a crash
        reply.update(ok=False, error=one_line(f"{req.get('op')} failed: {type(e).__name__}: {e}"))
    client.emit(reply)


def dispatch(client, line):
    """Parse one protocol line and start a thread for it."""
    try:
        req = json.loads(line.decode("utf-8"))
    except ValueError as e:  # the line itself is not echoed: it may contain the session key
        client.emit({"event": "log", "level": "warning", "message": one_line(f"bad line: {e}")})
        return
    if not isinstance(req, dict) or not isinstance(req.get("id"), int):
        client.emit(
            {"event": "log", "level": "warning", "message": "request without an integer id"}
        )
        return
    threading.Thread(target=handle, args=(client, req), daemon=True).start()
