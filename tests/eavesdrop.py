"""Another user of the remote host trying to read a kernel's iopub: run as root, it becomes
USER for good (every uid and gid, no supplementary groups) before it touches a socket.

pyzmq is imported first, as root: root's interpreter lies under /root, which other users
cannot read, so the user could not start it. DIR is entered as root too and is where a
relative ``ipc://`` path starts, the way ``/tmp`` is open to everyone on a real host (the
tests' own temporary directories are not).

usage: python eavesdrop.py USER DIR URL MARKER
prints, one line each:
  ``connect ok`` or ``connect <errno name>``: a plain socket connection to the endpoint;
  ``handshake ok|failed|timeout|skipped``: a ZMQ SUB socket's handshake (skipped when the
      endpoint refused the connection);
  ``markers N`` once stdin closes: how many iopub messages carried MARKER.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

HANDSHAKE_TIMEOUT = 10.0
READ_LIMIT = 60.0  # seconds, in case stdin never closes
FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
)


def become(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    assert os.getresuid() == (entry.pw_uid,) * 3 and os.getgroups() in ([], [entry.pw_gid])


def plain_connect(url: str) -> str:
    """Connect a plain socket to a ``tcp://`` or ``ipc://`` endpoint: ``ok`` or the errno."""
    scheme, _, where = url.partition("://")
    if scheme == "tcp":
        host, _, port = where.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address: object = (host, int(port))
    else:
        sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), where
    sock.settimeout(5)
    try:
        sock.connect(address)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()


def handshake(sub: zmq.Socket[bytes], url: str) -> str:
    """Connect the SUB socket to url and wait for its first handshake to succeed or fail
    (the monitor is attached first, so that no event is missed)."""
    monitor = sub.get_monitor_socket()
    sub.connect(url)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000)):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if event in FAILED:
                return "failed"
        return "timeout"
    finally:
        sub.disable_monitor()
        monitor.close()


def count_markers(sub: zmq.Socket[bytes] | None, marker: bytes) -> int:
    """Read iopub until stdin closes; count the messages that carry ``marker``."""
    poller = zmq.Poller()
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    if sub is not None:
        poller.register(sub, zmq.POLLIN)
    found, deadline = 0, time.monotonic() + READ_LIMIT
    while time.monotonic() < deadline:
        events = dict(poller.poll(1000))
        if sub is not None and sub in events:
            found += any(marker in frame for frame in sub.recv_multipart())
        if sys.stdin.fileno() in events and not os.read(sys.stdin.fileno(), 1024):
            break
    return found


def main(user: str, directory: str, url: str, marker: str) -> None:
    os.chdir(directory)
    become(user)
    reached = plain_connect(url)
    print(f"connect {reached}", flush=True)
    context = zmq.Context()
    sub = None
    if reached == "ok":
        sub = context.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        print(f"handshake {handshake(sub, url)}", flush=True)
    else:
        print("handshake skipped", flush=True)
    print(f"markers {count_markers(sub, marker.encode())}", flush=True)
    if sub is not None:
        sub.close()
    context.term()


if __name__ == "__main__":
    main(*sys.argv[1:])
