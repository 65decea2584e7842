"""The client's end of a kept kernel: nothing is lost across an outage, either way.

jupyter_client (or VS Code) connects to the shell, control, stdin and iopub ports we give
it; behind them this link carries every message over one connection (the tunnel's link
forward) to the kernel's keeper on the remote side (``remote/keeper.py``), each numbered
and acknowledged. Whenever the connection is (re)made, the link resumes after the last
message it got, so what the kernel sent while we were away (output, replies) arrives once
and in order, and resends what the kernel never got from us. iopub messages are handed on
while the client is subscribed (they wait for it briefly, as after a reattach). Frames pass
unchanged: the kernel's and the client's signatures stand. When the keeper had to drop
messages (its bound, ``output_buffer``), the link adds one note saying how many, in the cell
the next message belongs to: a ``stream`` message, signed with the kernel's session key like
any message the client accepts. (The heartbeat stays a plain forward.)
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import zmq
from jupyter_client.session import Session

from .encryption import use_curve
from .foreign_output import ForeignOutput
from .tunnel import LOOPBACK, bind_error

LINKED = ("shell", "control", "stdin", "iopub")  # the channels the link carries
DELIMITER = b"<IDS|MSG>"
ACK_EVERY = 0.25  # seconds between acknowledgements while messages flow (also a heartbeat)
ACK_BYTES = 256 << 10  # acknowledge at once after this many bytes
HEARTBEAT = 1.0  # seconds between acknowledgements when nothing flows
IOPUB_WAIT = 10.0  # seconds an iopub message waits for a subscriber before it is dropped
BATCH = 256  # messages taken from the keeper in one go
Socket = zmq.Socket[bytes]


def _unregister(poller: zmq.Poller, sock: Socket) -> None:
    with contextlib.suppress(KeyError):
        poller.unregister(sock)


def note_text(dropped: int, limit: int) -> str:
    return (
        f"[jupyter-remote-provisioner] {dropped} output message(s) of this kernel were "
        f"dropped while no client was connected: the remote side keeps the newest "
        f"{limit / (1 << 20):g} MiB (kernelspec key output_buffer)\n"
    )


class SessionLink:
    """The client's ports for the linked channels; ``follow`` points the link at a keeper."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.log = log
        self.ports: dict[str, int] = {}
        self.context: zmq.Context[Socket] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake: Socket | None = None
        self._target: tuple[int, dict[str, str]] | None = None
        self._session: Session | None = None
        self.rid = os.urandom(8).hex().encode("ascii")  # our id for the keeper, way up
        self.stream = b""  # the keeper's stream (one per kernel process)
        self.adopted = False  # a kept kernel reattached: see foreign_output.py

    def bind(
        self,
        ports: Mapping[str, int],
        keys: Mapping[str, str],
        key: bytes | str,
        signature_scheme: str,
    ) -> dict[str, int]:
        """Listen on 127.0.0.1 for the client (``shell_port`` … as given, else any free
        port), with Curve when the client uses it (``keys``). Once bound, stays bound."""
        with self._lock:
            if self._thread is not None:
                return self.ports
            self.context = zmq.Context()
            fronts: dict[bytes, Socket] = {}
            try:
                for name in LINKED:
                    fronts[name.encode()] = self._listen(name, ports.get(f"{name}_port", 0), keys)
            except BaseException:
                for sock in fronts.values():
                    sock.close()
                self.context.term()
                self.context, self.ports = None, {}
                raise
            key = key.encode() if isinstance(key, str) else key
            self._session = Session(
                key=key, signature_scheme=signature_scheme, username="remote-provisioner"
            )
            wake = self.context.socket(zmq.PAIR)
            wake.bind(f"inproc://session-link-{id(self)}")
            self._wake = self.context.socket(zmq.PAIR)
            self._wake.connect(f"inproc://session-link-{id(self)}")
            pump = _Pump(self, fronts, wake)
            self._thread = threading.Thread(target=pump.run, name="session-link", daemon=True)
            self._thread.start()
            if self._target is not None:
                self._wake.send(b"follow")
            return self.ports

    def _listen(self, name: str, port: int, keys: Mapping[str, str]) -> Socket:
        assert self.context is not None
        sock = self.context.socket(zmq.XPUB if name == "iopub" else zmq.ROUTER)
        sock.linger = 0
        if name == "iopub":
            sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full client pipe waits, never drops
        else:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone client is an error, not a hang
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting takes its place
        use_curve(sock, keys, server=True)
        try:
            sock.bind(f"tcp://{LOOPBACK}:{port}")
        except zmq.ZMQError as exc:
            sock.close()
            raise bind_error(name, port, OSError(exc.errno, exc.strerror)) from None
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        self.ports[name] = int(endpoint.rsplit(b":", 1)[1])
        return sock

    def adopt(self) -> None:
        """This client takes over a kernel another one started (``reattach``): output of
        requests it did not send goes under its next execute_request."""
        self.adopted = True

    def foreign(self) -> ForeignOutput | None:
        if not self.adopted or self._session is None:
            return None
        return ForeignOutput(self._session)

    def connection_info(self) -> dict[str, int]:
        return {f"{name}_port": port for name, port in self.ports.items()}

    def follow(self, port: int, keys: Mapping[str, str]) -> None:
        """Link to the keeper forwarded to 127.0.0.1:port (the tunnel's link listener)."""
        target = (port, dict(keys))
        with self._lock:
            if target == self._target:
                return
            self._target = target
            if self._wake is not None:
                self._wake.send(b"follow")

    def close(self) -> None:
        with self._lock:
            wake, self._wake = self._wake, None
            if wake is not None:
                wake.send(b"close")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if wake is not None:
            wake.close()
        if self.context is not None:
            self.context.term()
            self.context = None
        self.ports = {}

    def connect_back(self) -> tuple[Socket, Socket]:
        """A DEALER toward the current target, and its monitor (a handshake: resume)."""
        assert self._target is not None and self.context is not None
        port, keys = self._target
        back = self.context.socket(zmq.DEALER)
        back.linger = 0
        back.setsockopt(zmq.RECONNECT_IVL, 50)
        back.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        use_curve(back, keys, server=False)
        monitor = back.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        back.connect(f"tcp://{LOOPBACK}:{port}")
        return back, monitor

    def note(self, parent_frames: list[bytes], dropped: int, limit: int) -> list[bytes]:
        """The note of a gap: a stderr stream message in the cell of the message after it."""
        assert self._session is not None
        self.log.warning(
            "%d output message(s) of the kernel were dropped while no client was connected "
            "(output_buffer: %g MiB)", dropped, limit / (1 << 20),
        )  # fmt: skip
        parent: dict[str, Any] = {}
        with contextlib.suppress(ValueError, IndexError):
            parent = json.loads(parent_frames[parent_frames.index(DELIMITER) + 3])
        content = {"name": "stderr", "text": note_text(dropped, limit)}
        msg = self._session.msg("stream", content, parent=parent)
        return list(self._session.serialize(msg, ident=b"stream"))


class _Pump:
    """The link's thread: the client's messages up, the kernel's down, each once, in order."""

    def __init__(self, link: SessionLink, fronts: dict[bytes, Socket], wake: Socket) -> None:
        self.link, self.fronts, self.wake = link, fronts, wake
        self.channel_of = {sock: name for name, sock in fronts.items()}
        self.back: Socket | None = None
        self.monitor: Socket | None = None
        self.subscribed = 0  # client subscriptions (XPUB passes the first and the last)
        self.resyncing = False  # resume sent, its answer not yet here
        # down: (seq, channel, ident, frames, since) waiting for the client, in order
        self.pending: collections.deque[tuple[int, bytes, bytes, list[bytes], float]] = (
            collections.deque()
        )
        self.gap: tuple[int, int] | None = None  # (dropped, limit): noted before the next
        self.last = 0  # the last seq taken from the keeper
        self.handed = 0  # the last seq handed to the client
        self.acked, self.acked_at, self.unacked = 0, time.monotonic(), 0
        # up: (seq, channel, ident, frames) not yet acknowledged by the keeper
        self.up: collections.deque[tuple[int, bytes, bytes, list[bytes]]] = collections.deque()
        self.up_next = 1
        self.foreign: ForeignOutput | None = None  # made once the link follows a kernel
        self.poller = zmq.Poller()
        for sock in (*fronts.values(), wake):
            self.poller.register(sock, zmq.POLLIN)

    def run(self) -> None:
        try:
            while True:
                timeout = 10 if self.pending else int(ACK_EVERY * 1000)
                events = dict(self.poller.poll(timeout))
                if self.wake in events and not self._woken():
                    return
                for sock, channel in self.channel_of.items():
                    if sock in events:
                        self._from_client(channel, sock.recv_multipart())
                if self.monitor is not None and self.monitor in events:
                    self.monitor.recv_multipart()  # (re)connected to the keeper
                    self._resume()
                if self.back is not None and self.back in events:
                    self._drain()
                self._flush()
                self._acknowledge()
        finally:
            self._close_back()
            for sock in (*self.fronts.values(), self.wake):
                sock.close()

    def _woken(self) -> bool:
        """follow (a new target): link to it; close: False."""
        if self.wake.recv() == b"close":
            return False
        self._close_back()
        self.foreign = self.foreign or self.link.foreign()
        self.back, self.monitor = self.link.connect_back()
        self.poller.register(self.monitor, zmq.POLLIN)
        self._gate()
        return True

    def _close_back(self) -> None:
        if self.back is None:
            return
        _unregister(self.poller, self.back)
        if self.monitor is not None:
            _unregister(self.poller, self.monitor)
            self.back.disable_monitor()
            self.monitor.close()
        self.back.close()
        self.back = self.monitor = None

    def _gate(self) -> None:
        """Read from the keeper only while nothing waits for the client."""
        if self.back is None:
            return
        if self.pending:
            _unregister(self.poller, self.back)
        else:
            self.poller.register(self.back, zmq.POLLIN)

    def _from_client(self, channel: bytes, msg: list[bytes]) -> None:
        if channel == b"iopub":  # a subscription
            if msg[0][:1] in (b"\x00", b"\x01"):
                self.subscribed += 1 if msg[0][:1] == b"\x01" else -1
            return
        entry = (self.up_next, channel, msg[0], msg[1:])
        self.up_next += 1
        if self.foreign is not None and channel == b"shell":
            now = time.monotonic()
            for frames in self.foreign.upstream(msg[1:]):
                self.pending.append((0, b"iopub", b"", frames, now))
        self.up.append(entry)
        if self.back is not None and not self.resyncing:
            self._send_up(entry)

    def _send_up(self, entry: tuple[int, bytes, bytes, list[bytes]]) -> None:
        assert self.back is not None
        seq, channel, ident, frames = entry
        self.back.send_multipart([b"u", self.link.rid, str(seq).encode(), channel, ident, *frames])

    def _resume(self) -> None:
        assert self.back is not None
        self.back.send_multipart(
            [b"resume", self.link.stream, str(self.last).encode(), self.link.rid]
        )
        self.resyncing = True

    def _drain(self) -> None:
        """Take what the keeper sent, up to a batch, then hand it on (fewer polls)."""
        assert self.back is not None
        for _ in range(BATCH):
            try:
                msg = self.back.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            self._from_keeper(msg)
        self._gate()

    def _from_keeper(self, msg: list[bytes]) -> None:
        kind = msg[0]
        if kind == b"r" and len(msg) >= 6:
            self._resumed(msg[1], int(msg[2]), int(msg[3]), int(msg[4]), int(msg[5]))
        elif kind == b"a" and len(msg) >= 2:
            self._taken(int(msg[1]))
        elif kind == b"m" and len(msg) >= 4 and not self.resyncing:
            seq = int(msg[1])
            if seq > self.last + 1:  # skipped: ask again, to learn whether it was dropped
                self._resume()
            elif seq == self.last + 1:
                now = time.monotonic()
                if self.gap is not None and msg[2] == b"iopub":
                    note = self.link.note(msg[4:], *self.gap)
                    self.pending.append((0, b"iopub", b"", note, now))
                    self.gap = None
                if self.foreign is not None and msg[2] == b"iopub":
                    outs = self.foreign.downstream(msg[4:])  # none: held, acknowledged
                    for frames in outs[:-1]:
                        self.pending.append((0, b"iopub", b"", frames, now))
                    channel = b"iopub" if outs else b""
                    self.pending.append((seq, channel, b"", outs[-1] if outs else [], now))
                else:
                    self.pending.append((seq, msg[2], msg[3], msg[4:], now))
                self.last = seq

    def _resumed(self, stream: bytes, first: int, oldest: int, limit: int, taken: int) -> None:
        """The keeper resumes at ``first`` (another stream: a new kernel process, or this
        link new to it); ``oldest`` > ``first``: those between were dropped. Of ours it
        has taken up to ``taken``: the rest goes again (renumbered for a new kernel)."""
        self.resyncing = False
        self.last = max(first, oldest) - 1
        if oldest > first:
            self.gap = (oldest - first, limit)
        if stream != self.link.stream:
            self.link.stream = stream
            self.handed = self.acked = self.last
            if taken == 0:
                renumbered = [(i, *entry[1:]) for i, entry in enumerate(self.up, start=1)]
                self.up = collections.deque(renumbered)
                self.up_next = len(self.up) + 1
        self._taken(taken)
        for entry in self.up:
            self._send_up(entry)

    def _taken(self, seq: int) -> None:
        while self.up and self.up[0][0] <= seq:
            self.up.popleft()

    def _flush(self) -> None:
        """Hand what waits to the client, in order, as fast as it takes it."""
        while self.pending:
            seq, channel, ident, frames, since = self.pending[0]
            if not channel:
                pass  # nothing to hand on (held for later): acknowledged all the same
            elif channel == b"iopub" and not self.subscribed:
                if time.monotonic() - since < IOPUB_WAIT:
                    return  # a client is (re)connecting: its subscription comes
            else:
                try:
                    if channel == b"iopub":
                        self.fronts[channel].send_multipart(frames, flags=zmq.NOBLOCK)
                    else:
                        self.fronts[channel].send_multipart([ident, *frames], flags=zmq.NOBLOCK)
                except zmq.Again:
                    return
                except zmq.ZMQError:
                    pass  # that client is gone (EHOSTUNREACH): as the kernel itself would
            self.pending.popleft()
            self.handed = max(self.handed, seq)
            self.unacked += sum(len(f) for f in frames)
        self._gate()

    def _acknowledge(self) -> None:
        """Tell the keeper what the client has (it stops keeping it); also a heartbeat."""
        if self.back is None or not self.link.stream or self.resyncing:
            return
        now = time.monotonic()
        due = HEARTBEAT if self.handed == self.acked else ACK_EVERY
        if self.unacked >= ACK_BYTES or now - self.acked_at >= due:
            self.back.send_multipart([b"ack", self.link.stream, str(self.handed).encode()])
            self.acked, self.acked_at, self.unacked = self.handed, now, 0
