"""The daemon: accept clients on the socket, orphan and reap kernels, exit when idle."""

import contextlib
import json
import os
import platform
import signal
import socket
import sys
import threading
import time

from .adopt import adopt_orphans
from .common import (
    PROTOCOL,
    START_TIMEOUT,
    AgentError,
    base_lock,
    base_root,
    daemon_files,
    ensure_base_dir,
    ipykernel_version,
    process_start,
    user_name,
)
from .job import FIRST_CLIENT_GRACE as JOB_FIRST_CLIENT_GRACE
from .job import SESSION_PID, job_root, remove_job_files
from .ops import dispatch
from .records import SELF
from .table import (
    CLIENTS,
    EXITED,
    EXITED_KEEP,
    KERNELS,
    LOCK,
    SHUTDOWN_GRACE,
    STATE,
    Client,
    terminate_kernels,
)

REAP_INTERVAL = 0.5
FIRST_CLIENT_GRACE = 10.0  # seconds a new daemon waits for its first client
ADOPT_EVERY = 4  # reaper rounds between looks for kernels of a daemon that died
SOCKET_CHECK = 1.0  # seconds between checks that our socket is still there


def hello(client):
    info = {"event": "hello", "protocol": PROTOCOL, "pid": os.getpid(), "daemon_pid": os.getpid()}
    info.update(client=client.id)
    info.update(
        executable=sys.executable, python=platform.python_version(), ipykernel=ipykernel_version()
    )
    info.update(home=os.path.expanduser("~"), user=user_name(), base=STATE["base"])
    return info


def serve(sock):
    """One client: hello, then its request lines until it disconnects."""
    client = Client(sock)
    with LOCK:
        if STATE["closing"]:  # the relay sees EOF before any hello, and retries
            client.close()
            return
        CLIENTS.add(client)
        STATE["served"] = True
    try:
        client.emit(hello(client))
        first = True
        for line in sock.makefile("rb"):
            client.last_seen = time.monotonic()
            if first and line.startswith(b'{"relay"'):
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    relay = json.loads(line.decode("utf-8"))["relay"]
                    client.env, client.relay_pid = dict(relay["env"]), int(relay["pid"])
            elif line.strip():
                dispatch(client, line)
            first = False
    except OSError:
        pass
    disconnect(client)


def disconnect(client):
    """The client is gone: orphan the kernels only it held, stop those due now, maybe exit."""
    session = client.env.get(SESSION_PID)  # through srun (job.py)
    with LOCK:
        CLIENTS.discard(client)
        for k in KERNELS.values():
            if client in k.clients:
                k.clients.discard(client)
                if session:
                    k.stale_sessions.add(session)
                if not k.clients:
                    k.orphaned_at = time.monotonic()
    for k in reap():  # the channel closes once they are cleaned up, as in protocol 1
        k.done.wait(5.0)
    client.close()
    maybe_exit()


def reap():
    """Stop the orphaned kernels whose orphan_timeout has passed since they were both
    unattended and idle (a kernel running a cell is never reaped); forget old exits."""
    now = time.monotonic()
    with LOCK:
        due = [
            k for k in KERNELS.values()
            if not k.clients and not k.stopping and k.orphan_timeout is not None
            and not k.activity.busy
            and now - max(k.orphaned_at, k.activity.idle_mono) >= k.orphan_timeout
        ]  # fmt: skip
        for k in due:
            k.stopping = True
        for kid in [kid for kid, e in EXITED.items() if now - e[0] > EXITED_KEEP]:
            del EXITED[kid]
    if due:
        terminate_kernels(due, SHUTDOWN_GRACE)
    return due


def drop_silent_clients():
    """Disconnect clients that promised keepalives and went silent: their link is dead even
    if sshd has not noticed (no ClientAliveInterval), so their kernels become orphans."""
    now = time.monotonic()
    with LOCK:
        silent = [
            c for c in CLIENTS
            if c.silence_limit is not None and now - c.last_seen > c.silence_limit
        ]  # fmt: skip
    for client in silent:
        client.close()  # its serve() loop ends and disconnects it


def reaper():
    rounds = 0
    while True:
        time.sleep(REAP_INTERVAL)
        rounds += 1
        drop_silent_clients()
        if rounds % ADOPT_EVERY == 0:
            adopt_orphans()  # kernels of a daemon that died, also with no client asking
        reap()
        maybe_exit()


def idle():
    """No kernels and no clients (and, for a new daemon, its first client came or is late)."""
    grace = JOB_FIRST_CLIENT_GRACE if STATE.get("job") else FIRST_CLIENT_GRACE
    with LOCK:
        waited = STATE["served"] or time.monotonic() - STATE["born"] > grace
        return not KERNELS and not CLIENTS and waited and not STATE["closing"]


def remove_files():
    """Remove the socket (so no relay connects any more), the log and the lock file, if they
    are still ours; call with the lock held, so a relay never races us between its connect
    and its spawn."""
    if not socket_intact():
        return  # removed under us, maybe replaced by another daemon's: not ours to touch
    sock_name, lock_name, log_name = daemon_files()
    for name in (sock_name, log_name, lock_name):
        with contextlib.suppress(OSError):
            os.unlink(name)


def maybe_exit():
    """Exit if idle; decided again under the lock, since a relay may connect meanwhile."""
    if not idle():
        return
    try:
        with base_lock(daemon_files()[1], START_TIMEOUT):
            with LOCK:
                if not idle():
                    return
                STATE["closing"] = True  # from here on serve() turns new clients away
            remove_files()
    except (AgentError, OSError):
        return  # try again on the reaper's next round
    leave()


def leave():
    """Exit now; a job's daemon first removes its private root (the job ends with it)."""
    if STATE.get("job"):
        remove_job_files()
    os._exit(0)


def on_daemon_signal(signum, frame):
    """SIGTERM/SIGHUP: stop every kernel, remove the socket, exit."""
    with LOCK:
        if STATE["closing"]:
            return
        STATE["closing"] = True
        kernels = list(KERNELS.values())
    terminate_kernels(kernels, SHUTDOWN_GRACE, remove=True)
    with contextlib.suppress(AgentError, OSError), base_lock(daemon_files()[1], START_TIMEOUT):
        remove_files()
    leave()


def listen():
    """Listen on the socket (0600) in the agent dir, replacing a stale one."""
    sock_name = daemon_files()[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_name)  # stale: the relay that started us found nobody listening
    old = os.umask(0o177)
    try:
        listener.bind(sock_name)
    finally:
        os.umask(old)
    listener.listen(64)
    listener.settimeout(SOCKET_CHECK)
    st = os.stat(sock_name)
    STATE["socket_id"] = (st.st_dev, st.st_ino)
    return listener


def answering(sock_name):
    """Does a daemon listen on sock_name?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.closing(probe):
        try:
            probe.connect(sock_name)
        except OSError:
            return False
    return True


def socket_intact():
    """Is our socket still at its path (not removed by a tmp cleaner, nor replaced)?"""
    try:
        st = os.stat(os.path.join(STATE["agent_dir"], daemon_files()[0]))
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == STATE["socket_id"]


def restore_socket(listener):
    """Our socket (or its dir) was removed under us: listen again; or, if a relay has started
    another daemon there meanwhile, exit and leave our kernels to it (it adopts them)."""
    try:
        STATE["agent_dir"] = ensure_base_dir(STATE["root"], "-agent")
        os.chdir(STATE["agent_dir"])
        with base_lock(daemon_files()[1], START_TIMEOUT):
            if socket_intact():
                return listener
            if answering(daemon_files()[0]):
                os._exit(0)  # hand over: no reaping, kernels and records stay
            replaced = listen()
    except (AgentError, OSError):
        return listener  # try again on the next round
    listener.close()
    return replaced


def daemon_main(job=False):
    """Adopt the kernels of a dead predecessor, listen in the agent dir under the base dir
    the relay chose (argv[1]), serve clients until idle. A Slurm job's daemon (``job``)
    uses the job's own root and gives kernels its environment (see job.py)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_daemon_signal)
    if job:
        STATE.update(job=True, root=job_root(), kernel_env=dict(os.environ))
    else:
        STATE["root"] = sys.argv[1] if len(sys.argv) > 1 else base_root()
    STATE["base"] = ensure_base_dir(STATE["root"])
    STATE["agent_dir"] = ensure_base_dir(STATE["root"], "-agent")
    os.chdir(STATE["agent_dir"])
    SELF.update(key=daemon_files()[0], pid=os.getpid(), start=process_start(os.getpid()))
    adopt_orphans()  # before the first client can ask for them
    if job:  # one daemon per job: a second start (an allocation shared by kernels) ends here
        with base_lock(daemon_files()[1], START_TIMEOUT):
            if answering(daemon_files()[0]):
                os._exit(0)
            listener = listen()
    else:
        listener = listen()
    threading.Thread(target=reaper, daemon=True).start()
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:  # noqa: UP041 - not TimeoutError before 3.10
            if not socket_intact():
                listener = restore_socket(listener)
            continue
        except OSError:
            time.sleep(0.1)
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
