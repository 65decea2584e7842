"""The keeper: nothing a kernel sends to its clients is lost while they are away.

A kernel's PUB socket drops what it publishes while no subscriber is connected; what it
sends into a link that died unnoticed (an sshd session still holding a dead forward) is
lost too, replies included: a cell that ends during an outage would never be seen to end.
So, for each kernel, the daemon runs a keeper (a thread, when this python has pyzmq, as
every python with ipykernel has). The kernel's clients reach it through one link instead
of four sockets: the local ``session_link`` receiver connects a DEALER to the keeper's
ROUTER and carries shell, control, stdin and iopub over it, both ways, each message
numbered and acknowledged:

- down (kernel to client): a SUB on the kernel's iopub, and per client identity a DEALER
  on each of shell, control and stdin (routing id = the client's, so the kernel addresses
  stdin requests and replies as it would the client itself). Every message gets the next
  number and stays in a buffer until acknowledged; a receiver that comes back resumes
  after the last one it got. The buffer is bounded (``output_buffer``): beyond it the
  oldest are dropped, and a receiver resuming behind them is told how many.
- up (client to kernel): numbered by the receiver, passed to the kernel once (repeats
  after a resume are dropped), acknowledged, so the receiver resends what never arrived.

Frames pass unchanged: messages stay signed by the kernel and by the client.

Link protocol (multipart; receiver DEALER -> keeper ROUTER):
  [b"resume", stream, last, rid]     send what follows ``last`` of ``stream`` (another
                                     stream: from the oldest message no one acknowledged);
                                     ``rid``: the receiver's own id, for the way up
  [b"ack", stream, seq]              the receiver has everything up to seq; also a heartbeat
  [b"u", rid, seq, channel, ident, *msg]  a client's message for the kernel
keeper -> receiver:
  [b"r", stream, first, oldest, limit, up]  resuming at ``first``; ``oldest`` > ``first``:
                                     those before were dropped (``limit``: the bound in
                                     bytes); ``up``: the last message taken from ``rid``
  [b"a", up]                         client messages taken so far
  [b"m", seq, channel, ident, *msg]  a kernel's message
The keeper also follows the kernel's ``status`` messages: a kernel is busy while some
request it announced busy has not gone idle (the reaper never stops a busy kernel).
"""

import collections
import json
import os
import threading
import time

try:
    import zmq
except ImportError:  # no keeper: clients reach the kernel's own sockets, as before
    zmq = None  # type: ignore[assignment]

DEFAULT_LIMIT = 64 << 20  # bytes kept for absent receivers (kernelspec key output_buffer)
WINDOW = 4 << 20  # bytes sent to a receiver ahead of its acknowledgement
PEER_SILENCE = 10.0  # seconds without a word after which a receiver counts as gone
BATCH = 256  # messages taken from one socket in one go
ROUTED = (b"shell", b"control", b"stdin")  # the kernel's ROUTER channels
DELIMITER = b"<IDS|MSG>"
CONTEXT = []  # type: list  # the daemon's one zmq context, made on first use


def available():
    """Can this python keep (has pyzmq)?"""
    return zmq is not None


def context():
    if not CONTEXT:
        CONTEXT.append(zmq.Context())
    return CONTEXT[0]


def parse(frames):
    """(msg_type, parent msg_id, content) of a kernel message; content only for status."""
    try:
        i = frames.index(DELIMITER)
        header = json.loads(frames[i + 2].decode("utf-8"))
        kind = header.get("msg_type")
        if kind != "status":
            return kind, None, None
        parent = json.loads(frames[i + 3].decode("utf-8")).get("msg_id")
        return kind, parent, json.loads(frames[i + 5].decode("utf-8"))
    except (ValueError, IndexError, AttributeError, UnicodeDecodeError):
        return None, None, None


class Activity:
    """Busy/idle from a kernel's status messages, and when it last published anything."""

    def __init__(self):
        self.busy_with = set()  # parents announced busy and not yet idle
        self.state = None  # "starting", "busy", "idle" (None: nothing heard yet)
        self.since = time.time()  # when state last changed (wall clock, for ps)
        self.idle_mono = time.monotonic()  # when it last went idle (for the reaper)
        self.last = None  # wall clock of the last message

    def note(self, kind, parent, content):
        self.last = time.time()
        if kind != "status" or not isinstance(content, dict):
            return
        state = content.get("execution_state")
        if state == "busy":
            self.busy_with.add(parent)
        elif state == "idle":
            self.busy_with.discard(parent)
        elif state == "starting":
            self.busy_with.clear()
        new = "busy" if self.busy_with else ("starting" if state == "starting" else "idle")
        if new != self.state:
            self.state, self.since = new, time.time()
            if new != "busy":
                self.idle_mono = time.monotonic()

    @property
    def busy(self):
        return self.state == "busy"


class Peer:
    """One receiver: how far it has been sent and has acknowledged."""

    def __init__(self, ident, sent):
        self.ident, self.sent, self.acked, self.in_flight = ident, sent, sent, 0
        self.heard = time.monotonic()


class Keeper:
    """One kernel's keeper: call start(), and close() once the kernel has exited.
    ``kernel`` maps channel names to the kernel's own zmq addresses."""

    def __init__(self, kernel, bind, keys, limit, activity):
        self.kernel, self.bind, self.keys = kernel, bind, dict(keys or {})
        self.limit = DEFAULT_LIMIT if limit is None else int(limit)
        self.activity = activity
        self.stream = os.urandom(8).hex().encode("ascii")
        self.kept = collections.deque()  # (seq, frames, size), seq consecutive
        self.kept_bytes = 0
        self.next_seq = 1
        self.acked = 0  # the highest seq any receiver acknowledged
        self.dropped = 0  # messages dropped by the bound (for ps and bench)
        self.taken = {}  # type: dict  # receiver id -> the last of its messages taken
        self.peers = {}  # type: dict  # routing id -> Peer
        self.routed = {}  # type: dict  # (channel, client identity) -> DEALER on the kernel
        self.ready = threading.Event()  # subscribed to the kernel's iopub
        self.closing = False
        self.thread = None

    def _socket(self, kind, server=False):
        sock = context().socket(kind)
        sock.linger = 0
        if self.keys:
            sock.curve_secretkey = self.keys["curve_secretkey"].encode("ascii")
            sock.curve_publickey = self.keys["curve_publickey"].encode("ascii")
            if server:
                sock.curve_server = True
            else:
                sock.curve_serverkey = self.keys["curve_publickey"].encode("ascii")
        return sock

    def start(self):
        """Bind the clients' endpoint and connect to the kernel's iopub; serve in a thread."""
        self.router = self._socket(zmq.ROUTER, server=True)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.sndhwm = 0  # bounded by WINDOW instead
        self.router.bind(self.bind)
        self.sub = self._socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RECONNECT_IVL, 10)
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sub.connect(self.kernel["iopub"])
        self.poller = zmq.Poller()
        for sock in (self.sub, self.router, self.monitor):
            self.poller.register(sock, zmq.POLLIN)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self):
        """Stop serving (the thread closes the sockets within a poll's 0.2 s)."""
        self.closing = True

    def _serve(self):
        try:
            while not self.closing:
                events = dict(self.poller.poll(200))
                if self.monitor in events:
                    self.monitor.recv_multipart()
                    self.ready.set()
                if self.sub in events:
                    self._drain(self.sub, b"iopub", b"")
                for (channel, ident), sock in list(self.routed.items()):
                    if sock in events:
                        self._drain(sock, channel, ident)
                if self.router in events:
                    self._from_peer(self.router.recv_multipart())
                self._forget_silent()
        finally:
            self.sub.disable_monitor()
            for sock in [self.monitor, self.sub, self.router, *self.routed.values()]:
                sock.close()

    def _drain(self, sock, channel, ident):
        """Take what the kernel sent on one socket, up to a batch (fewer polls)."""
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._from_kernel(channel, ident, frames)

    def _from_kernel(self, channel, ident, frames):
        if channel == b"iopub":
            kind, parent, content = parse(frames)
            if kind == "iopub_welcome":
                self.ready.set()  # addressed to our subscription, not to any client
                return
            self.activity.note(kind, parent, content)
        frames = [b"m", str(self.next_seq).encode(), channel, ident, *frames]
        size = sum(len(f) for f in frames)
        self.kept.append((self.next_seq, frames, size))
        self.next_seq += 1
        self.kept_bytes += size
        while self.kept_bytes > self.limit and len(self.kept) > 1:
            self.kept_bytes -= self.kept.popleft()[2]
            self.dropped += 1
        for peer in list(self.peers.values()):
            self._push(peer)

    def _from_peer(self, msg):
        if len(msg) < 4:
            return
        ident, cmd = msg[0], msg[1]
        if cmd == b"u" and len(msg) >= 6:
            self._to_kernel(ident, msg[2], msg[3], msg[4], msg[5], msg[6:])
            return
        stream, number = msg[2], msg[3]
        try:
            seq = int(number) if number else None
        except ValueError:
            return
        if cmd == b"resume":
            first = seq + 1 if stream == self.stream and seq is not None else self.acked + 1
            oldest = self.kept[0][0] if self.kept else self.next_seq
            peer = self.peers[ident] = Peer(ident, max(first, oldest) - 1)
            rid = msg[4] if len(msg) > 4 else b""
            numbers = (first, oldest, self.limit, self.taken.get(rid, 0))
            if self._send(peer, [b"r", self.stream, *(str(n).encode() for n in numbers)]):
                self._push(peer)
        elif cmd == b"ack" and stream == self.stream and seq is not None:
            peer = self.peers.get(ident)
            if peer is None:
                return  # not resumed (yet): its resume follows
            peer.heard = time.monotonic()
            if seq > peer.acked:
                peer.acked = min(seq, peer.sent)
                self._acknowledged(peer.acked)
                peer.in_flight = self._bytes_between(peer.acked, peer.sent)
                self._push(peer)

    def _to_kernel(self, peer_ident, rid, number, channel, ident, frames):
        """A client's message: to the kernel once, in order; acknowledged to the receiver."""
        try:
            seq = int(number)
        except ValueError:
            return
        taken = self.taken.get(rid, 0)
        if seq == taken + 1 and channel in ROUTED:
            self._dealer(channel, ident).send_multipart(frames)
            self.taken[rid] = taken = seq
        peer = self.peers.get(peer_ident)
        if peer is not None:
            peer.heard = time.monotonic()
            self._send(peer, [b"a", str(taken).encode()])

    def _dealer(self, channel, ident):
        """The DEALER that speaks for client ``ident`` on ``channel`` (made with its siblings:
        the kernel sends stdin requests to the identity of the shell request)."""
        key = (channel, ident)
        if key not in self.routed:
            for name in ROUTED:
                sock = self._socket(zmq.DEALER)
                sock.routing_id = ident
                sock.connect(self.kernel[name.decode()])
                self.routed[(name, ident)] = sock
                self.poller.register(sock, zmq.POLLIN)
        return self.routed[key]

    def _bytes_between(self, after, upto):
        """The size of the kept messages after seq ``after`` up to seq ``upto``."""
        if not self.kept:
            return 0
        oldest = self.kept[0][0]
        start, end = max(after + 1 - oldest, 0), min(upto + 1 - oldest, len(self.kept))
        return sum(self.kept[i][2] for i in range(start, end))

    def _acknowledged(self, seq):
        """A receiver has everything up to seq: no need to keep it."""
        self.acked = max(self.acked, seq)
        while self.kept and self.kept[0][0] <= self.acked:
            self.kept_bytes -= self.kept.popleft()[2]

    def _push(self, peer):
        """Send the peer what follows what it was sent, while its window allows."""
        if not self.kept:
            return
        oldest = self.kept[0][0]
        peer.sent = max(peer.sent, oldest - 1)  # dropped meanwhile: it sees the gap
        while peer.sent + 1 < self.next_seq and peer.in_flight < WINDOW:
            seq, frames, size = self.kept[peer.sent + 1 - oldest]
            if not self._send(peer, frames):
                return
            peer.sent, peer.in_flight = seq, peer.in_flight + size

    def _send(self, peer, frames):
        try:
            self.router.send_multipart([peer.ident, *frames], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # gone (EHOSTUNREACH): it resumes when it is back
            self.peers.pop(peer.ident, None)
            return False

    def _forget_silent(self):
        now = time.monotonic()
        for ident in [i for i, p in self.peers.items() if now - p.heard > PEER_SILENCE]:
            del self.peers[ident]

    def stats(self):
        return {"kept_bytes": self.kept_bytes, "kept": len(self.kept), "dropped": self.dropped}
