"""Kernels outlive their daemon: a daemon adopts the live kernels of a dead daemon of its own
interpreter (found by their records) as orphans, so their holders can attach again and the
orphan rules apply; it stops kernels that never finished starting and removes the dirs of
kernels that are gone."""

import contextlib
import json
import os
import shutil
import signal
import threading

from .common import Adopted, AgentError, killpg, process_alive
from .keeper import available as can_keep
from .launch import session_tag, start_keeper, watch
from .records import SELF, read_record, write_record
from .table import KERNELS, LOCK, STATE, USED_PORTS, Kernel

SCAN_LOCK = threading.Lock()  # one scan at a time


def adopt_orphans():
    """Look at every kernel dir in the base dir that no live daemon looks after."""
    base = STATE["base"]
    with SCAN_LOCK:
        with LOCK:
            known = {k.dir for k in KERNELS.values()}
        try:
            names = os.listdir(base)
        except OSError:
            return
        for name in names:
            kdir = os.path.join(base, name)
            rec = None if kdir in known else read_record(kdir)
            if rec is not None and not daemon_alive(rec["daemon"]):
                take_over(kdir, rec)


def daemon_alive(daemon):
    if daemon.get("pid") == SELF["pid"] and daemon.get("start") == SELF["start"]:
        return True  # ours (an exit being handled right now)
    with contextlib.suppress(TypeError, ValueError):
        return process_alive(int(daemon["pid"]), daemon.get("start"))
    return False


def take_over(kdir, rec):
    """The kernel in kdir lost its daemon: adopt it, stop it, or remove what it left."""
    if not process_alive(int(rec["pid"]), rec.get("start")):
        shutil.rmtree(kdir, ignore_errors=True)  # a dead kernel of a dead daemon
    elif rec["daemon"].get("key") != SELF["key"]:
        return  # another interpreter's kernel: its own daemon adopts it
    elif not rec.get("ready"):  # its start never finished: its client was told it failed
        killpg(int(rec["pgid"]), signal.SIGKILL)
        shutil.rmtree(kdir, ignore_errors=True)
    else:
        adopt(kdir, rec)


def adopt(kdir, rec):
    ports = [int(p) for p in rec.get("ports") or []]
    k = Kernel(str(rec["kernel"]), Adopted(int(rec["pid"]), rec.get("start")), kdir, ports,
               None, rec.get("orphan_timeout"))  # fmt: skip
    k.pgid, k.proc_start, k.ready = int(rec["pgid"]), rec.get("start"), True
    k.started, k.endpoints = rec.get("started") or k.started, rec.get("endpoints") or {}
    k.kernel_name = str(rec.get("kernel_name") or "")
    k.tag = session_tag(rec)
    k.ip = rec.get("ip") or ("127.0.0.1" if ports else None)
    with LOCK:
        if k.kid in KERNELS or STATE["closing"]:
            return
        KERNELS[k.kid] = k
        USED_PORTS.update(ports)
    keep_again(k, rec)
    with contextlib.suppress(OSError):
        write_record(k)  # now ours
    k.announced.set()
    threading.Thread(target=watch, args=(k,), daemon=True).start()


def keep_again(k, rec):
    """The dead daemon kept the kernel's messages: keep them again at the same endpoint
    (what the kernel sent between the two daemons is lost)."""
    keep_at = rec.get("keeper")
    if keep_at is None or not can_keep():
        return
    try:
        with open(os.path.join(k.dir, "connection.json")) as f:
            conn = json.load(f)
        start_keeper(k, keep_at, conn, rec.get("output_buffer"))
    except (OSError, ValueError, AgentError):
        pass  # its clients reach the kernel's own sockets
