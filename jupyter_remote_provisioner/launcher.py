"""``launch``: run a remote kernel for a client that ignores provisioners (VS Code).

Such a client writes a connection file with local ports it chose and runs the kernelspec's
``argv``. The launcher forwards exactly those ports to a remote kernel started with the
spec's ``metadata.kernel_provisioner.config``, and stays in the foreground while the kernel
lives: SIGINT interrupts the kernel, SIGTERM or SIGHUP shuts it down, and if the kernel dies
the launcher exits non-zero. On Windows, jupyter_client's and VS Code's interrupt event (or
Ctrl-C) interrupts and Ctrl-Break or the parent's end stops it (see :mod:`.signals`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loop
from .curve_bridge import CurveBridge
from .encryption import keys_of, new_keys
from .errors import ConfigError
from .kernel import RemoteKernel
from .kernelspec import PROVISIONER_NAME, provisioner_config, provisioner_of
from .provisioner import check_env, remote_env, settings_from_config
from .recovery import LOST
from .signals import SIGINT, SIGTERM, foreground_signals
from .tunnel import CHANNELS

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when the launcher is told to stop
LOOPBACK_NAMES = ("127.0.0.1", "localhost")

log = logging.getLogger("jupyter_remote_provisioner.launch")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run a remote kernel on a connection file (what a kernelspec's argv calls)",
        description="Start the remote kernel of a kernelspec and forward the ports of a "
        "connection file written by the client (VS Code runs this through the spec's argv). "
        "Stays in the foreground: SIGINT interrupts the kernel, SIGTERM/SIGHUP stop it.",
    )
    parser.add_argument(
        "--kernelspec",
        required=True,
        metavar="DIR",
        help="the kernelspec directory ({resource_dir})",
    )
    parser.add_argument(
        "-f",
        "--f",
        "--connection-file",
        dest="connection_file",
        required=True,
        metavar="FILE",
        help="the connection file the client wrote ({connection_file}); --f=FILE works too",
    )
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class Connection:
    """What the client's connection file fixes: local ports and the session."""

    ports: dict[str, int]
    session: dict[str, Any]


def read_spec_config(spec_dir: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The provisioner config and ``env`` of the kernelspec in ``spec_dir``."""
    path = Path(spec_dir).expanduser() / "kernel.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read kernelspec {path}: {exc}") from None
    if provisioner_of(spec) != PROVISIONER_NAME:
        raise ConfigError(f"kernelspec {path} does not use the {PROVISIONER_NAME}")
    return provisioner_config(spec), dict(spec.get("env") or {})


def read_connection_file(path: str) -> Connection:
    """Ports and session of the client's connection file (loopback TCP only). Curve keys in
    it are the client's: the remote kernel must use them (an ipykernel too old fails)."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read connection file {path}: {exc}") from None
    if info.get("transport", "tcp") != "tcp" or info.get("ip", "127.0.0.1") not in LOOPBACK_NAMES:
        raise ConfigError(
            f"connection file {path} asks for {info.get('transport')}://{info.get('ip')}; "
            f"the launcher only listens on tcp://127.0.0.1"
        )
    try:
        ports = {f"{name}_port": int(info[f"{name}_port"]) for name in CHANNELS}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"connection file {path} lacks the five channel ports") from None
    session = {
        "key": str(info.get("key", "")).encode(),
        "signature_scheme": info.get("signature_scheme", "hmac-sha256"),
        "kernel_name": info.get("kernel_name", ""),
    }
    curve = keys_of(info)
    if curve:
        session.update(curve=curve, curve_required=True)
    return Connection(ports, session)


def run(args: argparse.Namespace) -> int:
    config, spec_env = read_spec_config(args.kernelspec)
    connection = read_connection_file(args.connection_file)
    settings = settings_from_config(config)
    check_env(spec_env, "the kernelspec's env")
    log_to_stderr()
    if (
        settings.transport == "tcp"
        and "curve" not in connection.session
        and not settings.on_network
    ):
        log.warning(
            "warning: kernel traffic: unencrypted loopback tcp ports on %s: other users there "
            "can read every cell's code and output (the client's connection file has no Curve "
            "keys); use transport ipc if the kernel supports Unix sockets",
            settings.target.host.label,
        )
    kernel = RemoteKernel(str(uuid.uuid4()), settings, log)
    bridge = None
    if settings.on_network and "curve" not in connection.session:
        # the kernel must encrypt, the client cannot: encrypt between us and the kernel
        keys = new_keys()
        connection.session.update(curve=keys, curve_required=True)
        bridge = CurveBridge(keys)
    return asyncio.run(_serve(kernel, connection, remote_env(spec_env, os.environ), bridge))


def log_to_stderr() -> None:
    """Foreground commands log our INFO lines (not asyncssh's) to stderr."""
    logging.basicConfig(level=logging.INFO, format="[remote-kernel] %(message)s", stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


async def _serve(
    kernel: RemoteKernel,
    connection: Connection,
    env: dict[str, str],
    bridge: CurveBridge | None = None,
) -> int:
    """Start the kernel, relay signals to it until it ends or we are told to stop. With a
    ``bridge``, the client's ports are the bridge's, and the kernel's forwards its own."""
    stop = asyncio.Event()
    loop.acquire()
    try:
        if bridge is not None:
            bridge.bind(connection.ports)
            info = await loop.call(kernel.start(connection.session, env))
            bridge.connect(info)
        else:
            await loop.call(kernel.start(connection.session, env, connection.ports))
        with foreground_signals(stop.set, interrupt=lambda: _interrupt(kernel)):
            ended = await kernel_end_or(kernel, stop)
            if not ended.done():
                log.info("Stopping the remote kernel")
                await loop.call(kernel.signal(SIGTERM))
                try:
                    await asyncio.wait_for(asyncio.shield(ended), STOP_GRACE)
                except asyncio.TimeoutError:
                    await loop.call(kernel.stop())
                return 0
        return exit_code(kernel.exit_status)
    finally:
        try:
            await loop.call(kernel.close())
        finally:
            if bridge is not None:
                bridge.close()
            loop.release()


async def kernel_end_or(kernel: RemoteKernel, event: asyncio.Event) -> asyncio.Future[Any]:
    """Wait until the remote kernel ends or ``event`` is set; return the future of the
    kernel's end (done if it ended; the caller may wait on it further)."""
    ended = asyncio.ensure_future(loop.call(kernel.wait()))
    waiting = asyncio.ensure_future(event.wait())
    await asyncio.wait({ended, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    return ended


_interrupts: set[asyncio.Future[None]] = set()


def _interrupt(kernel: RemoteKernel) -> None:
    """SIGINT handler: interrupt the remote kernel; the launcher itself carries on."""

    async def deliver() -> None:
        try:
            await loop.call(kernel.signal(SIGINT))
        except Exception as exc:  # noqa: BLE001 - a failed interrupt must not end the launcher
            log.warning("Could not interrupt the remote kernel: %s", exc)

    task = asyncio.ensure_future(deliver())
    _interrupts.add(task)
    task.add_done_callback(_interrupts.discard)


def exit_code(status: int | None) -> int:
    """0 for a clean exit, the kernel's status otherwise (128+N for signal N), never 0."""
    if status == 0:
        return 0
    if status is None or status == LOST:
        return 1
    return 128 - status if status < 0 else min(status, 255)
