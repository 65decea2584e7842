"""SSH connections: through the jump chain, host keys verified, one shared per target.

Every hop is authenticated and its host key checked against known_hosts exactly like the
kernel's host. Failures become one-line :class:`ConnectError` messages that name the hop
and the remedy. :class:`Connection` is one such chain; ``pool.py`` shares them among the
kernels of the process.

Two things keep the link fast on real networks:

- every channel (the jump tunnels, the kernel's forwards) opens with a receive window of
  :data:`WINDOW`, wide enough for the bandwidth-delay product of a distant link;
- each jump host runs one empty session, because OpenSSH's sshd turns on TCP_NODELAY for a
  connection only once a session has run on it; a jump host that refuses sessions gets
  TCP_QUICKACK from our side instead (Linux), so its Nagle delay waits for one round trip
  rather than for our delayed ACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh

from .errors import ConnectError
from .target import Hop, Target

log = logging.getLogger(__name__)

# AES-GCM is several times faster than asyncssh's default chacha20 on CPUs with AES-NI.
FAST_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
# asyncssh sends a keepalive after each keepalive_interval with nothing received, and drops
# the connection at the next interval once this many are unanswered: 2 makes the loss
# noticed 3 intervals after the last sign of life (as the README says).
KEEPALIVE_COUNT_MAX = 2
# Receive window of every channel we open: 2 MiB (asyncssh's default) caps a stream at
# 2 MiB per round trip, 50 MiB/s at 40 ms; 8 MiB allows 200 MiB/s there.
WINDOW = 8 << 20
# Run on a jump host only so that its sshd switches the connection to TCP_NODELAY.
NODELAY_COMMAND = "exit 0"
NODELAY_TIMEOUT = 10.0


class _Client(asyncssh.SSHClient):
    """Reports the loss of the connection to whoever owns it."""

    def __init__(self, on_lost: Callable[[Exception | None], None] | None = None) -> None:
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        if self._on_lost:
            self._on_lost(exc)


class Connection:
    """One SSH connection to a target, plus the jump connections it runs through."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.ssh: asyncssh.SSHClientConnection | None = None
        self.jumps: list[asyncssh.SSHClientConnection] = []
        self.users = 0
        self.lost = asyncio.Event()
        # per-connection singletons (remote agents), or futures of them
        self.resources: dict[Any, Any] = {}
        self._jump_sessions: list[asyncio.Task[None]] = []

    async def open(
        self,
        connect_timeout: float,
        keepalive_interval: float,
        on_hop: Callable[[int, float], None] | None = None,
    ) -> None:
        """Connect hop by hop; on any failure close what was opened and raise ConnectError.

        ``on_hop(index, seconds)`` is called as each hop is verified and authenticated.
        """
        opened: list[asyncssh.SSHClientConnection] = []
        try:
            for index in range(len(self.target.hops)):
                hop_started = time.monotonic()
                is_last = index == len(self.target.hops) - 1
                conn = await _connect_hop(
                    self.target,
                    index,
                    tunnel=opened[-1] if opened else None,
                    connect_timeout=connect_timeout,
                    # the target's keepalives cross every jump connection, and tell a
                    # dead link: jump hops need none of their own (each costs a timer
                    # reset per packet, on every layer)
                    keepalive_interval=keepalive_interval if is_last else 0,
                    on_lost=self._connection_lost if is_last else None,
                )
                opened.append(conn)
                if on_hop is not None:
                    on_hop(index, time.monotonic() - hop_started)
                if not is_last:  # meanwhile, the next hop's handshake goes on
                    self._jump_sessions.append(
                        asyncio.ensure_future(_nodelay_session(conn, self.target.hops[index]))
                    )
        except BaseException:
            self._cancel_jump_sessions()
            await _close_all(opened)
            raise
        self.ssh, self.jumps = opened[-1], opened[:-1]

    def _cancel_jump_sessions(self) -> None:
        for task in self._jump_sessions:
            task.cancel()
        self._jump_sessions = []

    def _connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    async def close(self) -> None:
        """Close the target connection, then the jump connections in reverse order."""
        self._cancel_jump_sessions()
        for resource in list(self.resources.values()):
            if isinstance(resource, asyncio.Future):
                if not resource.done():
                    resource.cancel()
                    continue
                if resource.cancelled() or resource.exception() is not None:
                    continue
                resource = resource.result()
            close = getattr(resource, "close", None)
            if close is not None:
                await close()
        self.resources.clear()
        await _close_all(self.jumps + ([self.ssh] if self.ssh else []))
        self.ssh, self.jumps = None, []


@contextlib.asynccontextmanager
async def private_connection(
    target: Target,
    connect_timeout: float,
    keepalive_interval: float,
    on_hop: Callable[[int, float], None] | None = None,
) -> AsyncIterator[Connection]:
    """A connection of its own (not pooled), for one command; closed on exit."""
    connection = Connection(target)
    try:
        await connection.open(connect_timeout, keepalive_interval, on_hop)
        yield connection
    finally:
        await connection.close()


async def _connect_hop(
    target: Target,
    index: int,
    tunnel: asyncssh.SSHClientConnection | None,
    connect_timeout: float,
    keepalive_interval: float,
    on_lost: Callable[[Exception | None], None] | None,
) -> asyncssh.SSHClientConnection:
    hop = target.hops[index]
    options: dict[str, Any] = {
        "port": hop.port,
        "username": hop.user,
        "config": list(target.config_paths),
        "tunnel": _WideTunnel(tunnel) if tunnel is not None else None,
        "known_hosts": _known_hosts(hop),
        "keepalive_interval": keepalive_interval,
        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        "connect_timeout": connect_timeout,
        "client_factory": lambda: _Client(on_lost),
        "window": WINDOW,
    }
    keys = [path for path in hop.identity_files if os.path.isfile(path)]
    if keys:
        options["client_keys"] = keys
    if not hop.has_ciphers:
        options["encryption_algs"] = FAST_CIPHERS
    try:
        return await asyncio.wait_for(asyncssh.connect(hop.alias, **options), connect_timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise explain(exc, target, index, connect_timeout) from exc


class _WideTunnel:
    """Opens the next hop's TCP stream through a jump connection with a window of WINDOW
    (asyncssh's own tunnels use 2 MiB, which caps every kernel behind that jump host)."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    async def create_connection(
        self, session_factory: Any, remote_host: str, remote_port: int
    ) -> tuple[Any, Any]:
        return await self._conn.create_connection(
            session_factory, remote_host, remote_port, window=WINDOW
        )


async def _nodelay_session(conn: asyncssh.SSHClientConnection, hop: Hop) -> None:
    """Run one empty session on a jump host: its sshd then sets TCP_NODELAY toward us.

    Without it, the jump host's sshd (which only forwards) keeps Nagle's algorithm on, and
    each of a kernel's small messages sent in a burst waits for our delayed ACK (~40 ms).
    A jump host that refuses sessions (MaxSessions 0, a forwarding-only account) gets
    TCP_QUICKACK after every read instead, on Linux: then a burst waits one round trip.
    """
    try:
        channel, _ = await asyncio.wait_for(
            conn.create_session(asyncssh.SSHClientSession, NODELAY_COMMAND), NODELAY_TIMEOUT
        )
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        quick = _ack_every_read(conn)
        log.info(
            "jump host %s refuses sessions (%s): its sshd keeps Nagle's algorithm on; %s",
            hop.label,
            getattr(exc, "reason", None) or type(exc).__name__,
            "acknowledging its packets at once instead"
            if quick
            else "round trips through it may take up to 40 ms longer",
        )
        return
    channel.close()  # the command has been started: sshd has switched already


def _ack_every_read(conn: asyncssh.SSHClientConnection) -> bool:
    """Send TCP ACKs for the first hop's socket at once after each read (Linux only)."""
    sock = conn.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None:
        return False
    received = conn.data_received

    def data_received(data: bytes, datatype: int | None = None) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        received(data, datatype)

    conn.data_received = data_received  # type: ignore[method-assign]
    return True


def _known_hosts(hop: Hop) -> Any:
    """The hop's known_hosts files; an empty list (trust nothing) when none exists."""
    files = [path for path in hop.known_hosts if os.path.isfile(path)]
    return files if files else asyncssh.import_known_hosts("")


def explain(exc: Exception, target: Target, index: int, timeout: float) -> ConnectError:
    """Turn an asyncssh/OS failure on hop ``index`` into a one-line message with a remedy."""
    hop = target.hops[index]
    role = "jump host" if index < len(target.hops) - 1 else "host"
    via = target.hops[index - 1] if index > 0 else None
    through = f" (through jump host {via.alias})" if via else ""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ConnectError(
            f"no answer from {role} {hop.label}{through} within {timeout:g} s; check that it "
            f"is up and reachable (network, VPN) or raise connect_timeout"
        )
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return _host_key_error(target, index)
    if isinstance(exc, asyncssh.PermissionDenied):
        return ConnectError(
            f"authentication as {hop.user} to {role} {hop.label} failed; check identity_file "
            f"(or IdentityFile in the ssh config) and that its public key is in "
            f"~/.ssh/authorized_keys there"
        )
    if isinstance(exc, asyncssh.ChannelOpenError) and via is not None:
        return ConnectError(
            f"jump host {via.label} could not open a connection to {role} {hop.label}: "
            f"{exc.reason}; check that {hop.hostname}:{hop.port} is right and up as seen from "
            f"{via.alias}"
        )
    if isinstance(exc, socket.gaierror):
        return ConnectError(
            f"cannot resolve the name of {role} {hop.hostname!r}; check the host name "
            f"(or its HostName in the ssh config)"
        )
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(
            f"{role} {hop.label} refused the SSH connection; check that sshd runs there and "
            f"listens on port {hop.port}"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return ConnectError(
            f"{role} {hop.label} is unreachable ({os.strerror(exc.errno)}); check the network "
            f"or VPN"
        )
    if isinstance(exc, asyncssh.KeyImportError):
        return ConnectError(f"cannot load the identity file for {hop.label}: {exc}")
    if isinstance(exc, asyncssh.DisconnectError):
        return ConnectError(f"{role} {hop.label} closed the connection during setup: {exc.reason}")
    return ConnectError(f"cannot connect to {role} {hop.label}: {exc}")


def _host_key_error(target: Target, index: int) -> ConnectError:
    hop = target.hops[index]
    reach = dataclasses.replace(target, hops=target.hops[: index + 1]).ssh_command()
    files = [path for path in hop.known_hosts if os.path.isfile(path)]
    known_file = _tilde(files[0] if files else hop.known_hosts[0])
    for path in files:
        known = asyncssh.read_known_hosts(path)
        for name in {hop.hostname, hop.alias}:
            if any(known.match(name, "", hop.port)):
                name_arg = f"[{name}]:{hop.port}" if hop.port != 22 else name
                return ConnectError(
                    f"host key for {hop.label} does NOT match {_tilde(path)}: the host was "
                    f"reinstalled or the connection is intercepted; if you trust the change, run "
                    f"`ssh-keygen -f {_tilde(path)} -R '{name_arg}'` then `{reach}` to check and "
                    f"add the new key"
                )
    return ConnectError(
        f"host key for {hop.label} is not in {known_file}; run `{reach}` once to check and add it"
    )


def _tilde(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


async def _close_all(conns: list[asyncssh.SSHClientConnection]) -> None:
    for conn in reversed(conns):
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            log.debug("timed out closing an SSH connection")
