"""One kernel's remote life: connect, launch, forward, watch, signal, stop, clean up.

Every coroutine here runs on the package loop (see ``loop.py``). The exit status is pushed
by the remote agent, so :attr:`RemoteKernel.exit_status` answers ``poll()`` with no network
round trip. A failed start leaves nothing behind: no listener, no connection, no remote
process or file.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .agent import AgentError, AgentLost, RemoteAgent
from .errors import LaunchError, RemoteKernelError
from .ssh import POOL, Connection
from .target import Target
from .tunnel import KernelTunnel

log = logging.getLogger(__name__)

IPYKERNEL_ARGV = ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
LOG_TAIL_LINES = 6
LOST = -1  # exit status reported when the connection (and with it the kernel) was lost
CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGKILL)


@dataclass(frozen=True)
class KernelSettings:
    """Everything needed to run one kernel remotely (from the kernelspec's config)."""

    target: Target
    python: str = "python3"
    kernel_argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    transport: str = "ipc"
    connect_timeout: float = 15.0
    launch_timeout: float = 60.0
    keepalive_interval: float = 15.0

    def argv(self) -> list[str]:
        """The remote command: ``kernel_argv`` when given, else ipykernel on ``python``."""
        return list(self.kernel_argv) if self.kernel_argv else [self.python, *IPYKERNEL_ARGV]


class RemoteKernel:
    """A kernel process on the target host, reached through a :class:`KernelTunnel`."""

    def __init__(
        self, kernel_id: str, settings: KernelSettings, logger: logging.Logger | None = None
    ):
        self.kernel_id = kernel_id
        self.settings = settings
        self.log = logger or log
        self.tunnel = KernelTunnel()
        self.exit_status: int | None = None
        self.pid: int | None = None
        self._conn: Connection | None = None
        self._agent: RemoteAgent | None = None
        self._exited = asyncio.Event()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    async def start(
        self,
        session: Mapping[str, Any],
        env: Mapping[str, str],
        ports: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """Launch the kernel and return jupyter_client connection info with local ports.

        ``session`` holds ``key`` (bytes), ``signature_scheme`` and ``kernel_name``. On a
        restart the connection and the local ports are reused.
        """
        started = time.monotonic()
        try:
            await self._connect()
            await self.tunnel.open(ports)
            reply = await self._launch(session, env)
        except BaseException:
            await self.close()
            raise
        self.pid = reply.get("pid")
        self.exit_status, self._running = None, True
        self._exited.clear()
        assert self._conn is not None and self._conn.ssh is not None
        self.tunnel.retarget(self._conn.ssh, reply["endpoints"])
        self.log.info(
            "Remote kernel %s started on %s (pid %s) in %.2f s",
            self.kernel_id,
            self.settings.target.describe(),
            self.pid,
            time.monotonic() - started,
        )
        return {
            "transport": "tcp",
            "ip": "127.0.0.1",
            **self.tunnel.connection_info(),
            "key": session["key"],
            "signature_scheme": session.get("signature_scheme", "hmac-sha256"),
            "kernel_name": session.get("kernel_name", ""),
        }

    async def _connect(self) -> None:
        settings = self.settings
        if self._conn is not None and self._conn.lost.is_set():
            lost, self._conn = self._conn, None
            await POOL.release(lost)
        if self._conn is None:
            self._conn = await POOL.acquire(
                settings.target, settings.connect_timeout, settings.keepalive_interval
            )
            self.log.info("SSH connection to %s ready", settings.target.describe())
        self._agent = await _agent_for(self._conn, settings)
        if not settings.kernel_argv and not self._agent.hello.get("ipykernel"):
            python = settings.python
            raise LaunchError(
                f"ipykernel is not installed for {python} on {settings.target.host.label}; "
                f"install it there with `{python} -m pip install ipykernel`, or set `python` "
                f"to an interpreter that has it"
            )

    async def _launch(self, session: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
        assert self._agent is not None
        settings = self.settings
        key = session["key"]
        self._agent.on_exit(self.kernel_id, self._on_exit)
        try:
            return await self._agent.request(
                "launch",
                reply_timeout=settings.launch_timeout + 5,
                kernel=self.kernel_id,
                argv=settings.argv(),
                env={**env, **settings.env},
                cwd=settings.cwd,
                transport=settings.transport,
                timeout=settings.launch_timeout,
                connection={
                    "key": key.decode() if isinstance(key, bytes) else key,
                    "signature_scheme": session.get("signature_scheme", "hmac-sha256"),
                    "kernel_name": session.get("kernel_name", ""),
                },
            )
        except AgentError as exc:
            self._agent.on_exit(self.kernel_id, None)
            raise self._launch_failure(exc.reply) from None
        except (AgentLost, asyncio.TimeoutError) as exc:
            self._agent.on_exit(self.kernel_id, None)
            raise LaunchError(
                f"lost the remote agent on {settings.target.host.label} while starting the "
                f"kernel: {exc or 'no answer'}; check the SSH connection"
            ) from None

    def _launch_failure(self, reply: Mapping[str, Any]) -> LaunchError:
        error = str(reply.get("error", "the kernel did not start"))
        tail_lines = [line for line in str(reply.get("log_tail", "")).splitlines() if line.strip()]
        tail = " | ".join(tail_lines[-LOG_TAIL_LINES:])
        where = self.settings.target.host.label
        if "No module named ipykernel" in tail:
            python = self.settings.python
            return LaunchError(
                f"ipykernel is not installed for {python} on {where}; install it there with "
                f"`{python} -m pip install ipykernel`"
            )
        if "did not start listening" in error:
            error += " (raise launch_timeout if the kernel is slow to start)"
        return LaunchError(
            f"remote kernel on {where}: {error}" + (f"; its output: {tail}" if tail else "")
        )

    def _on_exit(self, status: int | None, log_tail: str) -> None:
        self._running = False
        if status is None:
            # The agent stops its kernels when its channel closes (connection lost).
            self.exit_status = LOST
            self.log.warning(
                "Lost the SSH connection to %s: remote kernel %s was stopped with it",
                self.settings.target.describe(),
                self.kernel_id,
            )
        else:
            self.exit_status = status
            clean = status in CLEAN_EXITS
            lines = [] if clean else log_tail.strip().splitlines()[-LOG_TAIL_LINES:]
            tail = " | ".join(line for line in lines if line.strip())
            level = logging.INFO if clean else logging.WARNING
            self.log.log(
                level,
                "Remote kernel %s exited with status %s%s",
                self.kernel_id,
                status,
                f": {tail}" if tail else "",
            )
        self._exited.set()

    async def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel's process group on the remote host."""
        if not self._running or self._agent is None:
            return
        try:
            await self._agent.request(
                "signal",
                reply_timeout=self.settings.connect_timeout,
                kernel=self.kernel_id,
                signum=int(signum),
            )
        except AgentError as exc:
            self.log.debug("signal %s to kernel %s: %s", signum, self.kernel_id, exc)
            return
        except (AgentLost, asyncio.TimeoutError) as exc:
            raise RemoteKernelError(
                f"cannot signal the remote kernel on {self.settings.target.host.label}: "
                f"the SSH connection is down ({exc or 'no answer'})"
            ) from None
        self.log.info("Sent %s to remote kernel %s", _signal_name(signum), self.kernel_id)

    async def wait(self) -> int | None:
        """Wait for the kernel process to exit; return its status."""
        if self._running:
            await self._exited.wait()
        return self.exit_status

    async def stop(self, timeout: float = 5.0) -> None:
        """Make sure the kernel process is gone: SIGKILL its group and wait (bounded)."""
        if not self._running:
            return
        try:
            await self.signal(signal.SIGKILL)
            await asyncio.wait_for(self._exited.wait(), timeout)
        except (RemoteKernelError, asyncio.TimeoutError):
            self.log.warning("Remote kernel %s did not confirm its exit", self.kernel_id)
            self._running = False

    async def close(self) -> None:
        """Stop the kernel if needed, close the forwards and let go of the connection."""
        await self.stop()
        if self._agent is not None:
            self._agent.on_exit(self.kernel_id, None)
            self._agent = None
        await self.tunnel.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await POOL.release(conn)


async def _agent_for(conn: Connection, settings: KernelSettings) -> RemoteAgent:
    """The connection's agent for ``settings.python``, started once and shared."""
    key = ("agent", settings.python)
    existing: asyncio.Future[RemoteAgent] | None = conn.resources.get(key)
    pending: asyncio.Future[RemoteAgent]
    if existing is None or _unusable(existing):
        assert conn.ssh is not None
        pending = asyncio.ensure_future(
            RemoteAgent.start(conn.ssh, settings.python, settings.target.host.label,
                              settings.connect_timeout)
        )  # fmt: skip
        conn.resources[key] = pending
    else:
        pending = existing
    try:
        return await asyncio.shield(pending)
    except BaseException:
        if conn.resources.get(key) is pending and pending.done():
            del conn.resources[key]
        raise


def _unusable(pending: asyncio.Future[RemoteAgent]) -> bool:
    """A finished agent start that failed, or an agent whose channel has closed."""
    if not pending.done():
        return False
    if pending.cancelled() or pending.exception() is not None:
        return True
    return pending.result().closed.is_set()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
