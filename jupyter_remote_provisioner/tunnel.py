"""The five forwards of one kernel: loopback listeners carried over SSH to its endpoints.

The listeners are our own (not asyncssh's forward listeners, which die with their
connection): they keep their local ports across a kernel restart and can be pointed at a
new connection or new remote endpoints, so connected clients simply reconnect. Each
accepted connection opens one SSH channel to the kernel's Unix socket (or loopback port);
those channels do not count against sshd's MaxSessions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Mapping
from functools import partial

import asyncssh
from asyncssh.forward import SSHForwarder, SSHLocalPortForwarder

from .errors import LaunchError
from .ssh import WINDOW

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
LOOPBACK = "127.0.0.1"

Endpoint = str | int  # a remote Unix socket path, or a remote TCP port (on the tunnel's host)


class _Forwarder(SSHLocalPortForwarder):
    """asyncssh's local forwarder, remembered by its tunnel so closing it closes the stream."""

    def __init__(
        self,
        tunnel: KernelTunnel,
        conn: asyncssh.SSHClientConnection,
        dest: Endpoint,
        host: str = LOOPBACK,
    ):
        super().__init__(conn, self._open)
        self._dest, self._host = dest, host
        self._tunnel = tunnel
        tunnel.active.add(self)

    async def _open(self, session_factory: object, _host: str, _port: int) -> object:
        conn = self._conn
        if isinstance(self._dest, int):
            return await conn.create_connection(
                session_factory,  # type: ignore[arg-type]
                self._host,
                self._dest,
                window=WINDOW,
            )
        return await conn.create_unix_connection(
            session_factory,  # type: ignore[arg-type]
            self._dest,
            window=WINDOW,
        )

    def close(self) -> None:
        self._tunnel.active.discard(self)
        super().close()


class _Refuse(asyncio.Protocol):
    """Closes connections that arrive while the kernel has no live endpoint."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class KernelTunnel:
    """Loopback listeners for the five channels, retargetable while they stay bound."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.active: set[SSHForwarder] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._conn: asyncssh.SSHClientConnection | None = None
        self._endpoints: dict[str, Endpoint] = {}
        self._host = LOOPBACK

    async def open(
        self, ports: Mapping[str, int] | None = None, channels: tuple[str, ...] = CHANNELS
    ) -> dict[str, int]:
        """Bind the listeners of ``channels`` on 127.0.0.1: the given ports (launcher mode)
        or ephemeral ones. Once bound, they stay."""
        if self._servers:
            return self.ports
        loop = asyncio.get_running_loop()
        try:
            for name in channels:
                wanted = ports.get(f"{name}_port", 0) if ports else 0
                try:
                    server = await loop.create_server(partial(self._accept, name), LOOPBACK, wanted)
                except OSError as exc:
                    raise bind_error(name, wanted, exc) from None
                self._servers.append(server)
                self.ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.close()
            raise
        return self.ports

    def retarget(
        self,
        conn: asyncssh.SSHClientConnection | None,
        endpoints: Mapping[str, Endpoint],
        host: str | None = None,
    ) -> None:
        """Send new client connections to ``endpoints`` over ``conn`` (None: refuse them);
        TCP ports are on ``host`` as the far end of ``conn`` sees it (default: its loopback;
        a Slurm compute node's address, reached from the login node)."""
        self._conn = conn
        self._endpoints = dict(endpoints)
        self._host = host or LOOPBACK

    def drop_connections(self) -> None:
        """Close every forwarded stream, so clients reconnect to the current target."""
        for forwarder in list(self.active):
            forwarder.close()

    def _accept(self, name: str) -> asyncio.BaseProtocol:
        dest = self._endpoints.get(name)
        if self._conn is None or dest is None:
            return _Refuse()
        return _Forwarder(self, self._conn, dest, self._host)

    async def close(self) -> None:
        """Stop listening and close every forwarded stream."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        self.drop_connections()
        for server in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.debug("timed out closing a forward listener")
        self._conn, self._endpoints, self.ports = None, {}, {}

    def connection_info(self) -> dict[str, int]:
        """``shell_port`` … ``control_port`` as jupyter_client names them (those we have)."""
        return {f"{name}_port": port for name, port in self.ports.items() if name in CHANNELS}


def bind_error(channel: str, port: int, exc: OSError) -> LaunchError:
    """One line for a local listener that could not be bound."""
    where = f"{LOOPBACK} for the kernel's {channel} channel"
    if port:
        where = f"{LOOPBACK}:{port}, the {channel} port of the connection file"
    if exc.errno == errno.EADDRINUSE:
        return LaunchError(
            f"cannot listen on {where}: another program uses it; restart the kernel so that "
            f"the client picks free ports"
        )
    return LaunchError(f"cannot listen on {where}: {exc.strerror or exc}")
