"""The sync helper: the remote end of `remote_kernel sync` and of pre-launch uploads.

It runs in the exec channel's own process (no daemon) and reads requests on stdin until EOF.
Every message is a JSON line; one with "size" is followed by exactly that many raw bytes.

  {"id", "op": "stat", "path"}                        -> {"re", "ok", "path", "kind"}
  {"id", "op": "scan", "path", "exclude", "defaults"} -> {"re", "ok", "entries", "skipped"}
  {"id", "op": "hash", "paths"}                       -> {"re", "ok", "hashes"}
  {"id", "op": "mkdir", "path", "mode"}               -> {"re", "ok"}
  {"id", "op": "put", "path", "size", "mode", "mtime_ns", "ack_every"} + bytes
                                   -> {"re", "got"} every ack_every bytes written, {"re", "ok"}
  {"id", "op": "get", "path"}  -> {"re", "size", "mode", "mtime_ns"} + bytes, then {"re", "ok"}

A request with "more": true has others right behind it: its reply is not flushed alone.
Paths are absolute after "~" expansion, relative ones are taken from the home directory. A
failure is answered with {"ok": false, "error", "errno", "path", "action"}, after which the
helper removes its temporary file and exits: the local side stops at the first error.
"""

import errno
import json
import os
import signal
import sys

from .common import from_home
from .files import (
    CHUNK,
    MODE,
    MTIME,
    SIZE,
    Incoming,
    Rules,
    entry,
    file_hash,
    kind_of,
    make_dir,
    scan,
)  # fmt: skip


class Failed(Exception):
    def __init__(self, action, exc, path):
        Exception.__init__(self, exc.strerror or str(exc))
        self.action, self.exc, self.path = action, exc, path


class Helper:
    def __init__(self, stdin, stdout):
        self.stdin, self.stdout = stdin, stdout

    def send(self, message, data=b""):
        self.stdout.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")
        if data:
            self.stdout.write(data)

    def serve(self):
        while True:
            line = self.stdin.readline()
            if not line:
                return
            request = json.loads(line.decode("utf-8"))
            try:
                reply = getattr(self, "op_" + request["op"])(request)
            except Failed as failure:
                self.send(dict(failure_reply(failure), re=request.get("id")))
                self.stdout.flush()
                return
            self.send(dict(reply, re=request.get("id"), ok=True))
            if not request.get("more"):
                self.stdout.flush()

    def op_stat(self, request):
        path = from_home(request["path"])
        return {"path": path, "kind": kind_of(path)}

    def op_scan(self, request):
        path = from_home(request["path"])
        rules = Rules(request.get("exclude") or (), request.get("defaults", True))
        try:
            entries, skipped = scan(path, rules, request.get("recursive", True))
        except OSError as e:
            raise Failed("read", e, e.filename or path) from None
        return {"path": path, "entries": entries, "skipped": skipped}

    def op_hash(self, request):
        hashes = []
        for path in request["paths"]:
            try:
                hashes.append(file_hash(path))
            except OSError as e:
                raise Failed("read", e, path) from None
        return {"hashes": hashes}

    def op_mkdir(self, request):
        try:
            make_dir(request["path"], request.get("mode", 0o755))
        except OSError as e:
            raise Failed("create directory", e, e.filename or request["path"]) from None
        return {}

    def op_put(self, request):
        path, remaining = request["path"], request["size"]
        every, unreported = request.get("ack_every") or 0, 0
        try:
            incoming = Incoming(path, request["mode"], request["mtime_ns"])
        except OSError as e:
            raise Failed("write", e, path) from None
        try:  # any way out but commit() removes the temporary file (SIGTERM: SystemExit)
            while remaining:
                data = self.stdin.read(min(CHUNK, every or CHUNK, remaining))
                if not data:
                    raise OSError(errno.EPIPE, "the transfer was cut short")
                remaining -= len(data)
                incoming.write(data)
                unreported += len(data)
                if every and unreported >= every and remaining:
                    got = request["size"] - remaining
                    self.send({"re": request.get("id"), "got": got})
                    self.stdout.flush()
                    unreported = 0
            incoming.commit()
        except BaseException as e:
            incoming.abort()
            if isinstance(e, OSError):
                raise Failed("write", e, path) from None
            raise
        return {}

    def op_get(self, request):
        path = request["path"]
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below, errors told apart
        except OSError as e:
            raise Failed("read", e, path) from None
        with f:
            header = entry("", os.fstat(f.fileno()))
            self.send({"re": request.get("id"), "size": header[SIZE], "mode": header[MODE],
                       "mtime_ns": header[MTIME]})  # fmt: skip
            remaining, error = header[SIZE], None
            while remaining:
                try:
                    data = f.read(min(CHUNK, remaining)) if error is None else b""
                except OSError as e:
                    data, error = b"", e
                if not data:  # shrank or failed: pad to the announced size, then fail
                    error = error or OSError(errno.EIO, "the file changed while being read")
                    data = bytes(min(CHUNK, remaining))
                self.stdout.write(data)
                remaining -= len(data)
        if error is not None:
            raise Failed("read", error, path)
        return {}


def failure_reply(failure):
    code = getattr(failure.exc, "errno", None)
    return {
        "ok": False,
        "error": str(failure),
        "errno": errno.errorcode.get(code, "") if code else "",
        "path": failure.path,
        "action": failure.action,
    }


def sync_main():
    """Serve one sync session on stdin/stdout (SIGTERM and SIGHUP end it like Ctrl-C, so
    the file being written is removed)."""
    helper = Helper(sys.stdin.buffer, sys.stdout.buffer)

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        helper.send({"event": "hello", "python": sys.version.split()[0]})
        helper.stdout.flush()
        helper.serve()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        try:
            helper.stdout.flush()
        except OSError:
            pass
