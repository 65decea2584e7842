"""One kernel's remote life: connect, launch, forward, watch, reconnect, signal, stop, clean up.

Every coroutine here runs on the package loop (see ``loop.py``). The exit status is pushed
by the remote agent, so :attr:`RemoteKernel.exit_status` answers ``poll()`` with no network
round trip. A failed start leaves nothing behind: no listener, no connection, no remote
process or file. When the connection drops, the remote kernel keeps running (the agent's
daemon owns it) and ``recovery.py`` reconnects through the same chain,
re-attaches and points the same local listeners at it; only after ``reconnect_timeout``
is the kernel reported lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import asyncssh

from .agent import AgentError, AgentLost, RemoteAgent
from .encryption import keys_of, usable_keys
from .errors import LaunchError, RemoteKernelError
from .kernel_ports import KernelPorts
from .kernel_settings import KernelSettings
from .late_stop import stop_when_reachable
from .launch_steps import (
    LOG_TAIL_LINES,
    launch_failure,
    reach_error,
    unencrypted_on_network,
    upload,
)
from .pool import POOL
from .recovery import Reconnecting
from .signals import SIGKILL, SIGTERM
from .sites import Spot, agent_for, site_for
from .ssh import Connection
from .workdir import Placement, placement

log = logging.getLogger(__name__)

CLEAN_EXITS = (0, -SIGTERM, -SIGKILL)  # the remote host's numbers (POSIX)


class RemoteKernel(Reconnecting):
    """A kernel process on the target host, reached through a :class:`KernelTunnel`."""

    def __init__(
        self, kernel_id: str, settings: KernelSettings, logger: logging.Logger | None = None
    ):
        self.kernel_id = kernel_id
        self.settings = settings
        self.log = logger or log
        self.ports = KernelPorts(self.log)  # what the client connects to
        self.exit_status: int | None = None
        self.pid: int | None = None
        self._conn: Connection | None = None
        self._agent: RemoteAgent | None = None
        self._exited = asyncio.Event()
        self._running = False
        self._recovery: asyncio.Task[None] | None = None
        self._agent_client: int | None = None  # the agent daemon's id for our channel
        self._late_stop: asyncio.Task[None] | None = None  # see abandon()
        self.curve: dict[str, str] = {}  # the Curve keys the kernel runs with, if any
        self._daemon_pid: int | None = None  # the agent daemon that runs the kernel
        self.site = site_for(kernel_id, settings, self.log)  # where it runs (sites/)
        self.spot: Spot | None = None
        self.tag: tuple[str, str] | None = None  # (notebook, local user): reclaimable by
        # seconds of each step of the last start: ssh, place (a Slurm job's submission and
        # queue wait), agent (its hello), kernel (until it listens); for the log and bench/
        self.phases: dict[str, float] = {}
        self._phase_mark = 0.0

    @property
    def running(self) -> bool:
        return self._running

    async def start(
        self,
        session: Mapping[str, Any],
        env: Mapping[str, str],
        ports: Mapping[str, int] | None = None,
        local_dir: str | None = None,
    ) -> dict[str, Any]:
        """Upload, launch the kernel and return jupyter_client connection info with local ports.

        ``session`` holds ``key`` (bytes), ``signature_scheme`` and ``kernel_name``, and
        for transport encryption ``curve`` (the two Curve keys) and ``curve_required``.
        ``local_dir`` is the notebook's directory (default: ours), which ``path_map`` and
        ``upload`` are taken from. On a restart the connection and the local ports are reused.
        """
        started = self._phase_mark = time.monotonic()
        self.phases = {}
        settings = self.settings
        local_dir = local_dir or os.getcwd()
        where = placement(local_dir, settings.path_map, settings.cwd)
        stop_first = self._late_stop is not None and not self._late_stop.done()
        if stop_first:  # a restart after an outage: the old kernel goes first, then this one
            assert self._late_stop is not None
            self._late_stop.cancel()
        try:
            await self._connect(renew=True)
            if stop_first:
                await self._stop_abandoned()
            if settings.upload:
                await self._agent_ready()
                assert self._conn is not None
                await upload(self._conn, settings, local_dir, where.cwd, self.log)
            reply = await self._launch(session, env, where)
            await self._check_reach(reply)
            await self._open_ports(reply, ports, session)
        except BaseException as exc:
            better = await self._explained(exc)
            await self.close(persist=False)
            if better is not exc:
                raise better from None
            if not stop_first:
                raise
            # still unreachable: the old kernel is stopped when the host is back
            self._late_stop = stop_when_reachable(self.site, settings, self.kernel_id, self.log)
            if isinstance(exc, RemoteKernelError):
                raise type(exc)(
                    f"cannot restart the kernel: {exc}; the old kernel is stopped once "
                    f"{settings.target.host.label} answers again"
                ) from None
            raise
        self.pid = reply.get("pid")
        self.exit_status, self._running = None, True
        self._note_agent()
        self._exited.clear()
        assert self._conn is not None and self._conn.ssh is not None
        self._retarget(self._conn.ssh, reply)
        self.log.info(
            "Remote kernel %s started on %s (pid %s) in %.2f s",
            self.kernel_id,
            self._where(),
            self.pid,
            time.monotonic() - started,
        )
        return self._connection_info(session, self.curve)

    async def _open_ports(
        self, reply: Mapping[str, Any], ports: Mapping[str, int] | None, session: Mapping[str, Any]
    ) -> None:
        """Listen for the client; a port taken stops the new kernel."""
        try:
            await self.ports.open(reply, ports, self.curve, session)
        except LaunchError:
            await self._stop_abandoned()
            raise

    def _retarget(self, ssh: asyncssh.SSHClientConnection, reply: Mapping[str, Any]) -> None:
        self.ports.retarget(ssh, reply, self.curve)

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._phase_mark
        self._phase_mark = now

    async def _explained(self, exc: BaseException) -> BaseException:
        """A failed start, as the site explains it when it can (the Slurm job ended first)."""
        conn = self._conn
        if not isinstance(exc, RemoteKernelError) or conn is None or conn.lost.is_set():
            return exc
        try:
            return await self.site.explain(conn, exc)
        except RemoteKernelError:
            return exc

    def _where(self) -> str:
        """The SSH chain, and the node behind it when the kernel does not run at its end."""
        chain = self.settings.target.describe()
        label = self.spot.label if self.spot else ""
        return chain if label in ("", self.settings.target.host.label) else f"{label} via {chain}"

    def _connection_info(
        self, session: Mapping[str, Any], curve: Mapping[str, str]
    ) -> dict[str, Any]:
        return self.ports.client_info(session, curve)

    async def _curve_keys(self, session: Mapping[str, Any]) -> dict[str, str]:
        """The Curve keys asked for, unless the remote ipykernel is too old to use them
        (its version comes with the agent's hello, waited for only in that case)."""
        keys, settings = keys_of(session.get("curve") or {}), self.settings
        spot = self.spot
        exposed = spot is not None and spot.network
        if spot is not None and exposed and not keys:
            raise unencrypted_on_network(spot.label)
        if not keys or settings.kernel_argv:
            return keys
        await self._agent_ready()
        assert self._agent is not None
        return usable_keys(
            keys, bool(session.get("curve_required")) or exposed,
            self._agent.hello.get("ipykernel"), settings.target.host.label, settings.python,
            settings.transport, self.log,
        )  # fmt: skip

    async def _connect(self, renew: bool = False) -> None:
        """A live connection, the kernel's spot (``renew``: a new one if it is gone, for a
        start) and the spot's agent."""
        settings = self.settings
        if self._conn is not None and self._conn.lost.is_set():
            lost, self._conn = self._conn, None
            await POOL.release(lost)
        if self._conn is None:
            self._conn = await POOL.acquire(
                settings.target, settings.connect_timeout, settings.keepalive_interval
            )
            self.log.info("SSH connection to %s ready", settings.target.describe())
        self._phase("ssh")
        self.spot = await self.site.place(self._conn, renew)
        self._phase("place")
        self._agent = await agent_for(
            self._conn, settings.python, self.spot, settings.keepalive_interval
        )

    async def _agent_ready(self) -> None:
        """Wait for the agent's hello; fail with one line if it cannot run the kernel."""
        assert self._agent is not None
        settings = self.settings
        hello = await self._agent.ready(settings.connect_timeout)
        if not settings.kernel_argv and not hello.get("ipykernel"):
            python = settings.python
            raise LaunchError(
                f"ipykernel is not installed for {python} on {settings.target.host.label}; "
                f"install it there with `{python} -m pip install ipykernel`, or set `python` "
                f"to an interpreter that has it"
            )

    async def _launch(
        self, session: Mapping[str, Any], env: Mapping[str, str], where: Placement
    ) -> dict[str, Any]:
        """Ask the agent to start the kernel; sent before the agent's hello arrived (on a new
        connection), so that its start and the kernel's overlap the round trip."""
        agent, settings = self._agent, self.settings
        assert agent is not None
        key = session["key"]
        self.curve = await self._curve_keys(session)
        agent.on_exit(self.kernel_id, self._on_exit)
        launch = asyncio.ensure_future(
            agent.request(
                "launch",
                reply_timeout=settings.launch_timeout + settings.connect_timeout + 5,
                kernel=self.kernel_id,
                argv=settings.argv(),
                env={**env, **settings.env},
                cwd=where.cwd,
                create_cwd=where.mapped,
                transport=settings.transport,
                timeout=settings.launch_timeout,
                orphan_timeout=settings.orphan_timeout,
                output_buffer=max(1, int(settings.output_buffer * (1 << 20))),
                tag=list(self.tag) if self.tag else None,
                connection={
                    "key": key.decode() if isinstance(key, bytes) else key,
                    "signature_scheme": session.get("signature_scheme", "hmac-sha256"),
                    "kernel_name": session.get("kernel_name", ""),
                    **self.curve,
                },
            )
        )
        try:
            await self._agent_ready()
            self._phase("agent")
            reply = await launch
            self._phase("kernel")
            return reply
        except LaunchError:
            # the launch fails remotely too (no python, no ipykernel): wait for that, so
            # that nothing of it is left when the connection closes
            await asyncio.wait([launch], timeout=settings.launch_timeout)
            if not launch.done():
                launch.cancel()
            elif not launch.cancelled():
                launch.exception()  # retrieved: the hello's failure is the one to report
            raise
        except AgentError as exc:
            raise launch_failure(exc.reply, self.settings) from None
        except (AgentLost, asyncio.TimeoutError) as exc:
            raise LaunchError(
                f"lost the remote agent on {settings.target.host.label} while starting the "
                f"kernel: {exc or 'no answer'}; check the SSH connection"
            ) from None
        finally:
            if not launch.done() or launch.cancelled() or launch.exception() is not None:
                agent.on_exit(self.kernel_id, None)  # no kernel to watch (also after close())

    async def _check_reach(self, reply: Mapping[str, Any]) -> None:
        """A kernel on another machine than the SSH host (a Slurm node) must be reachable
        from there, or every client would wait for nothing."""
        if self.spot is None or not self.spot.network:
            return
        assert self._conn is not None
        error = await reach_error(self._conn, self.spot.label, reply, self.settings)
        if error is not None:
            await self._stop_abandoned()
            raise error

    async def _stop_abandoned(self) -> None:
        """Stop the kernel given up during an outage under this id, if it still runs."""
        assert self._agent is not None
        with contextlib.suppress(AgentError):
            timeout = self.settings.connect_timeout + 10
            await self._agent.request("stop", reply_timeout=timeout, kernel=self.kernel_id)

    def _on_exit(self, status: int | None, log_tail: str) -> None:
        if status is None:  # the agent's channel closed: the kernel runs on without us
            if self._running and self._recovery is None:
                self._recovery = asyncio.ensure_future(self._recover())
            return
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
        self._set_exited(status)
        if self._conn is not None and not self._conn.lost.is_set():
            asyncio.ensure_future(self._explain_exit(self._conn))

    async def _explain_exit(self, conn: Connection) -> None:
        """Let the site say (in the log) whether the kernel ended with its place."""
        with contextlib.suppress(RemoteKernelError):
            await self.site.ended(conn)

    def _set_exited(self, status: int) -> None:
        self._running = False
        self.exit_status = status
        self._exited.set()

    async def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel's process group on the remote host.

        Like ``os.kill`` for a local kernel, this returns once the signal is on its way: the
        agent's answer is not waited for (jupyter_client interrupts before every shutdown,
        so waiting would cost each shutdown a round trip); a refusal is logged.
        """
        if not self._running or self._agent is None:
            return
        try:
            answer = self._agent.send("signal", kernel=self.kernel_id, signum=int(signum))
        except AgentLost:
            raise RemoteKernelError(
                f"cannot send {_signal_name(signum)} to the remote kernel on "
                f"{self.settings.target.host.label}: the SSH connection is down and being "
                f"re-established; the kernel keeps running there, try again once it is back"
            ) from None
        answer.add_done_callback(functools.partial(self._signal_answered, signum))
        self.log.info("Sent %s to remote kernel %s", _signal_name(signum), self.kernel_id)

    def _signal_answered(self, signum: int, answer: asyncio.Future[dict[str, Any]]) -> None:
        if answer.cancelled():
            return
        problem = answer.exception() or (None if answer.result().get("ok") else answer.result())
        if problem is not None:
            self.log.debug("signal %s to kernel %s: %s", signum, self.kernel_id, problem)

    async def wait(self) -> int | None:
        """Wait for the kernel process to exit; return its status."""
        if self._running:
            await self._exited.wait()
        return self.exit_status

    async def stop(self, timeout: float = 5.0) -> None:
        """Make sure the kernel process is gone: SIGKILL its group and wait (bounded)."""
        if not self._running:
            return
        if self._recovery is not None:
            await self.abandon()
            return
        try:
            await self.signal(SIGKILL)
            await asyncio.wait_for(self._exited.wait(), timeout)
        except (RemoteKernelError, asyncio.TimeoutError):
            self.log.warning("Remote kernel %s did not confirm its exit", self.kernel_id)
            self._running = False

    async def close(self, keep_kernel: bool = False, persist: bool = True) -> None:
        """Stop the kernel if needed (unless ``keep_kernel``: detach, it runs on), close the
        forwards and let go of the connection: kept for ``connection_persist`` seconds
        when ``persist`` (after a kernel's life), closed at once otherwise (a failed start)."""
        if keep_kernel:
            self._running = False
            if self._recovery is not None:
                self._recovery.cancel()
        await self.stop()
        if self._agent is not None:
            self._agent.on_exit(self.kernel_id, None)
            self._agent = None
        await self.ports.close()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not keep_kernel and self._late_stop is None and not conn.lost.is_set():
            try:
                await self.site.release(conn)
            except RemoteKernelError as exc:
                self.log.warning("Could not release where kernel %s ran: %s", self.kernel_id, exc)
        await POOL.release(conn, self.settings.connection_persist if persist else 0.0)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
