"""What a kernel's client connects to: local ports, and how they reach the remote kernel.

A kept kernel (its remote side has a keeper, ``remote/keeper.py``) is reached through the
session link (``session_link.py``) for shell, control, stdin and iopub, which the tunnel
carries over one forward to the keeper; only the heartbeat is forwarded as it is. Without a
keeper (the remote python has no pyzmq), the tunnel forwards all five channels to the
kernel's own sockets. The ports stay the same across restarts and reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncssh

from .errors import LaunchError
from .session_link import LINKED, SessionLink
from .tunnel import KernelTunnel


def _only(ports: Mapping[str, int] | None, names: tuple[str, ...]) -> dict[str, int]:
    return {f"{n}_port": ports[f"{n}_port"] for n in names if ports and f"{n}_port" in ports}


class KernelPorts:
    """The tunnel's listeners and, for a kept kernel, the session link's."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.tunnel = KernelTunnel()
        self.link = SessionLink(log)
        self.kept = False

    async def open(
        self,
        reply: Mapping[str, Any],
        ports: Mapping[str, int] | None,
        curve: Mapping[str, str],
        session: Mapping[str, Any],
    ) -> None:
        """Listen for the client (``ports``: the client's own, as in a connection file;
        else free ones), as the agent's launch or attach ``reply`` says the kernel is
        reached. A LaunchError if a port is taken."""
        if reply.get("keeper") is None:
            await self.tunnel.open(ports)
            return
        self.kept = True
        try:
            await self.tunnel.open(_only(ports, ("hb",)), channels=("hb", "link"))
            self.link.bind(
                _only(ports, LINKED), curve, session.get("key", b""),
                str(session.get("signature_scheme", "hmac-sha256")),
            )  # fmt: skip
        except LaunchError:
            await self.close()
            raise

    def retarget(
        self, ssh: asyncssh.SSHClientConnection, reply: Mapping[str, Any], curve: Mapping[str, str]
    ) -> None:
        """Point the forwards at the kernel (its endpoints and keeper, from ``reply``)."""
        endpoints = dict(reply["endpoints"])
        if reply.get("keeper") is not None:
            endpoints["link"] = reply["keeper"]
        self.tunnel.retarget(ssh, endpoints, reply.get("ip"))
        if self.kept and "link" in self.tunnel.ports:
            self.link.follow(self.tunnel.ports["link"], curve)

    def refuse(self) -> None:
        """The link is dead: refuse new connections and close the forwarded ones, so that
        clients (and the session link) reconnect once we are back."""
        self.tunnel.retarget(None, {})
        self.tunnel.drop_connections()

    def client_info(self, session: Mapping[str, Any], curve: Mapping[str, str]) -> dict[str, Any]:
        """jupyter_client connection info: our listeners plus the session settings (and the
        Curve keys when the kernel encrypts: its client must use them too)."""
        return {
            "transport": "tcp",
            "ip": "127.0.0.1",
            **self.tunnel.connection_info(),
            **self.link.connection_info(),
            "key": session.get("key", ""),
            "signature_scheme": session.get("signature_scheme", "hmac-sha256"),
            "kernel_name": session.get("kernel_name", ""),
            **curve,
        }

    async def close(self) -> None:
        await self.tunnel.close()
        self.link.close()
        self.kept = False
