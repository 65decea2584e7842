"""Kernel records: a small 0600 file in each kernel dir naming the kernel, its process and the
daemon that runs it, so that a later daemon can find the kernels of one that died."""

import json
import os

RECORD = "record.json"
SELF = {}  # type: dict  # this daemon: {"key": its socket name, "pid", "start"} (daemon_main)


def record_path(kdir):
    return os.path.join(kdir, RECORD)


def write_record(k):
    """(Re)write k's record, atomically (a reader sees the old or the new one, never half)."""
    data = {
        "kernel": k.kid, "kernel_name": k.kernel_name, "pid": k.proc.pid, "pgid": k.pgid,
        "start": k.proc_start, "started": k.started, "ready": k.ready, "ports": k.ports,
        "endpoints": k.endpoints, "ip": k.ip, "orphan_timeout": k.orphan_timeout, "daemon": dict(SELF),
        "keeper": k.keeper_at, "output_buffer": k.output_buffer, "tag": k.tag,
    }  # fmt: skip
    temp = record_path(k.dir) + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(temp, record_path(k.dir))


def read_record(kdir):
    """The record in kdir as a dict, or None (no record yet, or not one of ours)."""
    try:
        with open(record_path(kdir)) as f:
            rec = json.load(f)
        int(rec["pid"]), int(rec["pgid"]), str(rec["kernel"]), dict(rec["daemon"])
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None
