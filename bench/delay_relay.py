"""A TCP relay that delays every chunk by a fixed time (a stand-in for a distant link).

    python3 bench/delay_relay.py --listen ADDR:PORT --connect ADDR:PORT --delay-ms D

For each accepted connection it connects to the destination and relays both directions.
Each chunk read is written out at its arrival time + D, in order: one queue and one writer
per direction, each waiting until the head chunk is due (not sleeping D per chunk), so
chunks arriving 1 ms apart leave 1 ms apart and the delay is not a bandwidth cap. Both
sockets have TCP_NODELAY. EOF (half-close) and close are passed on after the queued data.
Reading pauses only past QUEUE_LIMIT queued bytes per direction, so the throughput is set
by the endpoints (SSH windows), not by the relay.

It terminates TCP: handshakes, ACKs, windows and retransmits happen on each side's own
zero-delay hop; only the data is delayed, per chunk as the relay reads it. It prints
``ready`` once listening and exits on SIGTERM or SIGINT. It only connects to loopback or to
the bench's own 198.18.0.0/15 addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import signal
import socket
import sys

QUEUE_LIMIT = 64 << 20  # bytes queued per direction before the source stops being read
WRITE_HIGH_WATER = 4 << 20  # transport buffer before the writer waits for the peer
CONNECT_TIMEOUT = 10.0
# The loop's timers wake up to ~1 ms late (epoll's timeout is in whole ms, rounded up):
# aim half a millisecond early. Measured anyway: a 1-byte ping through a 20 ms relay takes
# ~41.5 ms (0.5 ms through a 0 ms one), so each direction is ~0.5 ms over the delay.
EARLY = 0.0005
ALLOWED = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "198.18.0.0/15")]


def address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def allowed(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in ALLOWED)


class Side(asyncio.Protocol):
    """One socket of a relayed connection: feeds what it reads into ``out``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.out: Pipe | None = None  # data read here goes there
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        assert self.out is not None
        self.out.feed(data)

    def eof_received(self) -> bool:
        assert self.out is not None
        self.out.feed(None)
        return True  # keep our writing half open: the other direction may go on

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()
        if self.out is not None:
            self.out.feed(None)  # no-op if EOF was already queued

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


class Pipe:
    """One direction: chunks stamped with their due time, written out by one task."""

    def __init__(self, delay: float, src: Side, dst: Side) -> None:
        self.delay, self.src, self.dst = delay, src, dst
        self.loop = asyncio.get_running_loop()
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.ended = False  # EOF queued
        self.paused = False
        self.wakeup = asyncio.Event()

    def feed(self, data: bytes | None) -> None:
        if self.ended:
            return
        self.queue.append((self.loop.time() + self.delay, data))
        self.wakeup.set()
        if data is None:
            self.ended = True
            return
        self.queued += len(data)
        if self.queued > QUEUE_LIMIT and not self.paused and self.src.transport is not None:
            self.paused = True
            self.src.transport.pause_reading()

    async def run(self, dst_ready: asyncio.Event) -> None:
        """Write each chunk when due; after the EOF, half-close the destination."""
        await dst_ready.wait()
        while True:
            while not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            due = self.queue[0][0]
            wait = due - self.loop.time() - EARLY
            if wait > 0:
                await asyncio.sleep(wait)
            transport = self.dst.transport
            assert transport is not None
            while self.queue and self.queue[0][0] <= self.loop.time() + EARLY:
                _, data = self.queue.popleft()
                if data is None:
                    if not transport.is_closing() and transport.can_write_eof():
                        transport.write_eof()
                    return
                if transport.is_closing():
                    raise ConnectionResetError("destination closed")
                transport.write(data)
                self.queued -= len(data)
            if self.paused and self.queued < QUEUE_LIMIT // 2:
                self.paused = False
                if self.src.transport is not None and not self.src.transport.is_closing():
                    self.src.transport.resume_reading()
            await self.dst.can_write.wait()


class Relay:
    """One accepted connection and its connection to the destination."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client = Side()
        self.upstream = Side()
        self.client.out = Pipe(server.delay, self.client, self.upstream)
        self.upstream.out = Pipe(server.delay, self.upstream, self.client)
        self.connected = asyncio.Event()
        self.task = asyncio.ensure_future(self.run())
        server.relays.add(self)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.client.out is not None and self.upstream.out is not None
        pipes = [
            asyncio.ensure_future(pipe.run(self.connected))
            for pipe in (self.client.out, self.upstream.out)
        ]
        try:
            host, port = self.server.connect
            await asyncio.wait_for(
                loop.create_connection(lambda: self.upstream, host, port), CONNECT_TIMEOUT
            )
            self.connected.set()
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            for pipe in done:
                pipe.result()  # raises the first error: both directions end
            self.close()  # both directions ended, after their data
        except (OSError, asyncio.TimeoutError) as exc:
            print(f"delay_relay: {exc!r}", file=sys.stderr, flush=True)
            self.abort()
        except asyncio.CancelledError:
            self.abort()
        finally:
            for pipe in pipes:
                pipe.cancel()
            self.server.relays.discard(self)

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()


class Server:
    def __init__(self, connect: tuple[str, int], delay: float) -> None:
        self.connect, self.delay = connect, delay
        self.relays: set[Relay] = set()

    def accept(self) -> Side:
        return Relay(self).client


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(args.connect, args.delay_ms / 1000)
    host, port = args.listen
    listener = await loop.create_server(server.accept, host, port, reuse_address=True)
    print("ready", flush=True)
    await stop.wait()
    listener.close()
    for relay in list(server.relays):
        relay.task.cancel()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(listener.wait_closed(), 5)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=address, required=True, metavar="ADDR:PORT")
    parser.add_argument("--connect", type=address, required=True, metavar="ADDR:PORT")
    parser.add_argument("--delay-ms", type=float, required=True, metavar="D",
                        help="one-way delay added to each direction, in ms")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("listen", "connect"):
        if not allowed(getattr(args, name)[0]):
            parser.error(f"--{name}: only loopback and 198.18.0.0/15 addresses are allowed")
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
