"""The daemon's tables: its kernels, their ports, its clients and recent exits, under one lock."""

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import threading
import time

from .common import exited, killpg, parent_pid, process_name, process_start
from .keeper import Activity

SHUTDOWN_GRACE = 3.0  # seconds an orphaned (or shut down) kernel gets to exit on SIGTERM
STOP_GRACE = 5.0  # seconds a kernel gets to exit on SIGTERM for the stop op
EXITED_KEEP = 600.0  # seconds an exit stays in the recently-exited table
LOCK = threading.RLock()  # guards KERNELS, USED_PORTS, CLIENTS, EXITED and STATE
KERNELS = {}  # type: dict  # kernel id (as given) -> Kernel, from spawn until exit is handled
USED_PORTS = set()  # type: set  # tcp ports handed to kernels that are still alive
CLIENTS = set()  # type: set  # connected Client objects
EXITED = {}  # type: dict  # kernel id -> (monotonic time, status, log tail), for attach
CLIENT_IDS = itertools.count(1)
STATE = {"closing": False, "served": False, "born": time.monotonic(), "socket_id": None}
STATE.update(root=None, base=None, agent_dir=None)  # the base dir's parent, it, the agent dir


class Kernel:
    """One spawned kernel process, the directory and ports it owns, and the clients that hold
    it (launched or attached to it, and still connected); with none it is an orphan (client
    None: adopted from a daemon that died, an orphan until a client attaches)."""

    def __init__(self, kid, proc, kdir, ports, client, orphan_timeout):
        self.kid, self.proc, self.dir, self.ports = kid, proc, kdir, ports
        self.pgid = proc.pid  # start_new_session=True makes the kernel its group leader
        self.proc_start = process_start(proc.pid)
        self.started = time.time()
        self.ready = False
        self.endpoints = {}
        self.ip = None  # the address its tcp endpoints listen on (None: Unix sockets)
        self.stale_sessions = set()  # login-node sshd sessions of clients gone (see job.py)
        self.kernel_name = ""  # the kernelspec it was started from, as the client named it
        self.tag = None  # (notebook path, local user's id) of a Jupyter session: reclaimable
        self.clients = {client} if client is not None else set()
        self.orphaned_at = None if client is not None else time.monotonic()
        self.orphan_timeout = orphan_timeout
        self.keeper = None  # its iopub keeper (keeper.py), if this python can keep
        self.keeper_at = None  # its keeper's endpoint (a Unix socket path or a tcp port)
        self.output_buffer = None  # bytes the keeper keeps (None: its default)
        self.activity = Activity()  # busy/idle from its status messages (via the keeper)
        self.stopping = False  # a stop, the reaper or shutdown has taken charge of it
        self.status = None
        self.announced = threading.Event()  # set once the launch reply is written
        self.done = threading.Event()  # set once its exit is fully handled


class Client:
    """One connection to the daemon (normally a relay, i.e. one SSH exec channel)."""

    def __init__(self, sock):
        self.id = next(CLIENT_IDS)
        self.relay_pid = None  # the relay process (a child of its sshd session), if known
        self.sock = sock
        self.env = dict(os.environ)  # replaced by the relay's environment (its first line)
        self.lock = threading.Lock()
        self.last_seen = time.monotonic()  # when its last line arrived
        self.silence_limit = None  # seconds of silence after which it counts as gone

    def emit(self, obj):
        """Send one JSON line; a vanished client is ignored (its disconnect handles it)."""
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8")
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def retire(self):
        """This client's SSH connection is dead and replaced (see op_attach): end its sshd
        session, which closes the stale forwards it holds to kernel sockets (a kernel's
        ROUTER would refuse a reconnecting client while they linger), then disconnect it."""
        session = parent_pid(self.relay_pid) if self.relay_pid else None
        if session is not None and process_name(session).startswith("sshd"):
            with contextlib.suppress(OSError):
                os.kill(session, signal.SIGTERM)
        self.close()

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def release(k):
    """Forget a kernel and give back its ports (the caller removes its files)."""
    with LOCK:
        USED_PORTS.difference_update(k.ports)
        if KERNELS.get(k.kid) is k:
            del KERNELS[k.kid]


def terminate_kernels(kernels, grace, remove=False):
    """SIGTERM each kernel's group, wait up to grace s, SIGKILL what is left (remove: and
    delete their dirs now, when no watcher will get to it)."""
    for k in kernels:
        killpg(k.pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(exited(k.proc) for k in kernels):
        time.sleep(0.02)
    for k in kernels:
        killpg(k.pgid, signal.SIGKILL)  # stragglers and any children they left
        if remove:
            shutil.rmtree(k.dir, ignore_errors=True)
