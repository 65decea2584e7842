"""CurveZMQ transport encryption: when a kernel's traffic is encrypted, and what is exposed.

On the remote host a kernel listens on Unix sockets in a private 0700 directory (``ipc``) or
on loopback ports (``tcp``). Any user of that host can connect to a loopback port and, over
plain ZMQ, read every message of iopub (code and output). CurveZMQ (jupyter_client 8.10,
ipykernel 7.4) encrypts each channel with keys that travel like the session key: in the
agent's protocol and the 0600 connection file, never on a command line or in kernel.json.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import zmq

from .errors import LaunchError

CURVE_KEYS = ("curve_publickey", "curve_secretkey")
IPYKERNEL_CURVE = (7, 4)  # the first ipykernel that reads Curve keys from its connection file
POLICIES = ("disabled", "auto", "required")


def declares_curve(metadata: Mapping[str, Any] | None) -> bool:
    """Whether a kernelspec's ``metadata.supported_encryption`` names ``curve`` (read the
    way jupyter_client reads it)."""
    declared = (metadata or {}).get("supported_encryption")
    if isinstance(declared, str):
        return declared.strip().lower() == "curve"
    if isinstance(declared, (list, tuple, set)):
        return "curve" in {str(item).strip().lower() for item in declared}
    return False


def wanted(policy: str, declared: bool, transport: str) -> bool:
    """Whether to encrypt: jupyter_client's ``transport_encryption`` asks for it (``required``,
    or ``auto`` with a kernel that declares Curve), or, whatever the policy, a kernel that
    declares Curve listens on tcp, where every user of its host could read it."""
    return policy == "required" or (declared and (policy == "auto" or transport == "tcp"))


def new_keys() -> dict[str, str]:
    """A fresh Curve key pair, Z85 text as in a connection file."""
    public, secret = zmq.curve_keypair()
    return {"curve_publickey": public.decode("ascii"), "curve_secretkey": secret.decode("ascii")}


def keys_of(info: Mapping[str, Any]) -> dict[str, str]:
    """The Curve keys in a connection info or file (text), or {} when it has not both."""
    keys = {k: info.get(k) for k in CURVE_KEYS}
    if not all(keys.values()):
        return {}
    return {k: v.decode("ascii") if isinstance(v, bytes) else str(v) for k, v in keys.items()}


def ipykernel_has_curve(version: str | None) -> bool:
    """Whether an ipykernel version (as the agent reports it) reads Curve keys."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return match is not None and (int(match[1]), int(match[2])) >= IPYKERNEL_CURVE


def traffic(
    host: str,
    transport: str,
    declared: bool,
    kernel_argv: bool,
    ipykernel: str | None = None,
    node: bool = False,
) -> tuple[bool, str]:
    """(exposed, one line) about who on ``host`` can read the kernel's traffic, as the
    provisioner runs it. ``ipykernel`` is the remote version when known (``check``).
    ``node``: the kernel runs on a Slurm compute node behind ``host``, on its network."""
    if node:
        if declared:
            return False, (
                f"kernel traffic: tcp ports on the compute node's address (forwarded from "
                f"{host}), encrypted with CurveZMQ; other users of the cluster cannot read it"
            )
        return True, (
            "warning: kernel traffic: a Slurm kernel listens on the compute node's network, "
            'so it starts only with CurveZMQ; declare "supported_encryption": ["curve"] '
            "in kernel.json's metadata"
        )
    if transport == "ipc":
        return False, (
            f"kernel traffic: Unix sockets in a private directory on {host}; other users "
            "there cannot connect"
        )
    curve = declared and (kernel_argv or ipykernel is None or ipykernel_has_curve(ipykernel))
    if curve:
        when = "" if kernel_argv or ipykernel else " (when ipykernel there is 7.4 or newer)"
        return False, (
            f"kernel traffic: loopback tcp ports on {host}, encrypted with CurveZMQ{when}; "
            "other users there cannot read it"
        )
    if kernel_argv:
        remedy = (
            "use transport ipc if the kernel supports Unix sockets, or declare "
            '"supported_encryption": ["curve"] in kernel.json\'s metadata if it supports CurveZMQ'
        )
    else:
        remedy = "use transport ipc, or ipykernel 7.4 or newer there with Curve declared"
    return True, (
        f"warning: kernel traffic: unencrypted loopback tcp ports on {host}: other users "
        f"there can read every cell's code and output; {remedy}"
    )


def usable_keys(
    keys: Mapping[str, str],
    required: bool,
    ipykernel: str | None,
    host: str,
    python: str,
    transport: str,
    log: logging.Logger,
) -> dict[str, str]:
    """The keys an ipykernel kernel runs with: ``keys`` when its version reads them; else
    none (logged), or a LaunchError when encryption is required. An older ipykernel would
    ignore them and listen in plain text, which no Curve client could talk to."""
    if ipykernel_has_curve(ipykernel):
        return dict(keys)
    if required:
        raise LaunchError(
            f"transport encryption is required but ipykernel {ipykernel} on {host} cannot "
            f"use CurveZMQ (7.4 or newer can); upgrade it there with "
            f"`{python} -m pip install -U ipykernel`"
        )
    log.log(
        logging.WARNING if transport == "tcp" else logging.INFO,
        "ipykernel %s on %s cannot use CurveZMQ (7.4 or newer can): the kernel runs "
        "unencrypted over %s", ipykernel, host, transport,
    )  # fmt: skip
    return {}


def use_curve(sock: zmq.Socket[bytes], keys: Mapping[str, str], server: bool) -> None:
    """Make ``sock`` speak CurveZMQ with ``keys`` (none: leave it plain): as the kernel's
    side (``server``) or as its client. Kernel and clients share one key pair."""
    if not keys:
        return
    sock.curve_secretkey = keys["curve_secretkey"].encode("ascii")
    sock.curve_publickey = keys["curve_publickey"].encode("ascii")
    if server:
        sock.curve_server = True
    else:
        sock.curve_serverkey = keys["curve_publickey"].encode("ascii")
