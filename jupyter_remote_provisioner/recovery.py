"""Getting a kernel back after its link or its agent dropped: reconnect through the same
chain and re-attach (the remote kernel runs on, owned by the agent's daemon), report it
lost after ``reconnect_timeout``, or give it up during an outage (a shutdown) and stop it
once its host answers again. A mixin of :class:`~.kernel.RemoteKernel`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import asyncssh

from .agent import AgentError, AgentLost, RemoteAgent
from .encryption import keys_of
from .errors import KernelGone, RemoteKernelError
from .kernel_ports import KernelPorts
from .kernel_settings import KernelSettings
from .late_stop import stop_when_reachable
from .sites import Site
from .ssh import Connection

LOST = -1  # exit status reported when the kernel could not be reached again
STALE_SESSION_TIMEOUT = 10.0  # seconds for ending the old session (one command)
RECONNECT_PAUSES = (0.5, 5.0)  # seconds between reconnect attempts: first, then doubling to max


async def end_stale_session(conn: Connection, pid: object) -> None:
    """End our old sshd session on the host (still holding forwards of the dead link to a
    kernel that runs elsewhere), as the agent does itself for kernels on the host."""
    if not str(pid).isdigit():
        return
    assert conn.ssh is not None
    command = f"ps -o comm= -p {pid} | grep -q '^sshd' && kill {pid}"
    with contextlib.suppress(asyncssh.Error, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(conn.ssh.run(command, check=False), STALE_SESSION_TIMEOUT)


class Reconnecting:
    """Reconnect, re-attach, give up: what RemoteKernel does when the link drops."""

    # provided by RemoteKernel
    kernel_id: str
    settings: KernelSettings
    log: logging.Logger
    ports: KernelPorts
    pid: int | None
    exit_status: int | None
    curve: dict[str, str]
    _conn: Connection | None
    _agent: RemoteAgent | None
    _running: bool
    _recovery: asyncio.Task[None] | None
    _late_stop: asyncio.Task[None] | None
    _agent_client: int | None
    _daemon_pid: int | None
    site: Site
    tag: tuple[str, str] | None

    async def _connect(self, renew: bool = False) -> None:
        raise NotImplementedError

    async def close(self, keep_kernel: bool = False, persist: bool = True) -> None:
        raise NotImplementedError

    def _on_exit(self, status: int | None, log_tail: str) -> None:
        raise NotImplementedError

    def _set_exited(self, status: int) -> None:
        raise NotImplementedError

    def _connection_info(
        self, session: Mapping[str, Any], curve: Mapping[str, str]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _retarget(self, ssh: asyncssh.SSHClientConnection, reply: Mapping[str, Any]) -> None:
        raise NotImplementedError

    async def _recover(self) -> None:
        """Reconnect, re-attach and re-point the listeners; give up after reconnect_timeout."""
        settings = self.settings
        where = settings.target.describe()
        agent = self._agent
        if agent is None or agent.link_lost:
            self.log.warning("Lost the SSH connection to %s; reconnecting (kernel %s keeps "
                             "running there)", where, self.kernel_id)  # fmt: skip
        else:
            self.log.warning(
                "The remote agent on %s closed its channel (exit status %s%s); the SSH "
                "connection is up. Restarting the agent and re-attaching to kernel %s", where,
                agent.exit_status, f": {agent.fatal}" if agent.fatal else "", self.kernel_id,
            )  # fmt: skip
        started = time.monotonic()
        deadline = started + settings.reconnect_timeout
        pause, problem = RECONNECT_PAUSES[0], "no attempt finished"
        try:
            while self._running:
                try:
                    await asyncio.wait_for(self._reattach(), max(0.1, deadline - time.monotonic()))
                    self.log.info("Reconnected to %s in %.1f s; kernel %s resumed", where,
                                  time.monotonic() - started, self.kernel_id)  # fmt: skip
                    return
                except AgentError as exc:
                    self._gone_while_away(exc.reply)
                    return
                except KernelGone:  # its place is gone too (the site logged why)
                    self._set_exited(LOST)
                    return
                except (RemoteKernelError, AgentLost, asyncio.TimeoutError, OSError) as exc:
                    problem = str(exc) or type(exc).__name__
                    self.log.debug("reconnect to %s failed: %s", where, problem)
                if time.monotonic() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
                pause = min(2 * pause, RECONNECT_PAUSES[1])
            if self._running:
                self.log.warning(
                    "Gave up reconnecting to %s after %g s (reconnect_timeout); kernel %s is "
                    "reported dead. Last error: %s", where, settings.reconnect_timeout,
                    self.kernel_id, problem,
                )  # fmt: skip
                self._set_exited(LOST)
        finally:
            self._recovery = None

    async def attach(self, ports: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Take hold of a kernel this package already runs on the target (kept, or held by
        another client): forward to it and return connection info with its session key."""
        try:
            reply = await self._reattach()
            connection = reply.get("connection") or {}
            await self.ports.open(reply, ports, self.curve, connection)
            assert self._conn is not None and self._conn.ssh is not None
            self._retarget(self._conn.ssh, reply)  # now that the listeners are there
        except AgentError as exc:
            await self.close(keep_kernel=True, persist=False)
            if "exited" in exc.reply:
                raise RemoteKernelError(
                    f"kernel {self.kernel_id} on {self.settings.target.host.label} exited "
                    f"recently (status {exc.reply['exited']})"
                ) from None
            raise RemoteKernelError(
                f"no kernel {self.kernel_id} on {self.settings.target.host.label}; "
                f"`remote_kernel ps` lists the running ones"
            ) from None
        except BaseException:
            await self.close(keep_kernel=True, persist=False)
            raise
        self.pid, self.exit_status, self._running = reply.get("pid"), None, True
        return self._connection_info(connection, self.curve)

    async def reclaim(self, kernel_name: str) -> dict[str, Any] | None:
        """Take over this notebook's kept kernel (see ``tag``), if the host has one that no
        client holds: forward to it and return connection info with its session key; None
        if there is none (then start one)."""
        assert self.tag is not None
        await self._connect()
        agent, conn = self._agent, self._conn
        assert agent is not None and conn is not None and conn.ssh is not None
        try:
            reply = await agent.request(
                "claim", reply_timeout=self.settings.connect_timeout, tag=list(self.tag),
                kernel_name=kernel_name,
            )  # fmt: skip
        except AgentError as exc:  # an old agent, or the kernel stopped meanwhile: start one
            self.log.debug("no kernel to reclaim: %s", exc)
            return None
        if not reply.get("kernel"):
            if reply.get("held"):
                self.log.info("This notebook's kept kernel on %s is held by another client "
                              "(the notebook is open elsewhere): starting a new one",
                              self.settings.target.host.label)  # fmt: skip
            return None
        self.kernel_id = str(reply["kernel"])
        agent.on_exit(self.kernel_id, self._on_exit)
        self._note_agent()
        connection = reply.get("connection") or {}
        self.curve = keys_of(connection)
        try:
            await self.ports.open(reply, None, self.curve, connection)
        except BaseException:
            await self.close(keep_kernel=True, persist=False)
            raise
        self.ports.link.adopt()  # the old page's output goes under this page's next cell
        self._retarget(conn.ssh, reply)
        self.pid, self.exit_status, self._running = reply.get("pid"), None, True
        self.log.info("Reattached to kernel %s on %s, kept for notebook %s (pid %s)",
                      self.kernel_id, self.settings.target.describe(), self.tag[0], self.pid)  # fmt: skip
        return self._connection_info(connection, self.curve)

    async def _reattach(self) -> dict[str, Any]:
        """One attempt: a live connection and agent, ownership of the kernel, the forwards."""
        replaces = None
        if self._conn is not None and self._conn.lost.is_set():
            self.ports.refuse()  # until we are back; clients reconnect then
            replaces = self._agent_client  # its remote end may linger: the daemon ends it
        await self._connect()
        agent, conn = self._agent, self._conn
        assert agent is not None and conn is not None and conn.ssh is not None
        agent.on_exit(self.kernel_id, self._on_exit)  # before the reply: no lost event
        try:
            reply = await agent.request(
                "attach",
                reply_timeout=self.settings.connect_timeout,
                kernel=self.kernel_id,
                replaces=replaces,
            )
        except BaseException:
            agent.on_exit(self.kernel_id, None)
            raise
        self._note_agent()
        for pid in reply.get("stale_sessions") or []:
            await end_stale_session(conn, pid)
        self.curve = keys_of(reply.get("connection") or {})
        self._retarget(conn.ssh, reply)
        return reply

    def _note_agent(self) -> None:
        """Remember the daemon's ids for our channel and for itself (see _gone_while_away)."""
        hello = self._agent.hello if self._agent else {}
        self._agent_client, self._daemon_pid = hello.get("client"), hello.get("daemon_pid")

    def _gone_while_away(self, reply: Mapping[str, Any]) -> None:
        """The kernel was not there to re-attach to: it exited, or was reaped as an orphan."""
        if "exited" in reply:
            self._on_exit(int(reply["exited"]), str(reply.get("log_tail") or ""))
            return
        daemon = self._agent.hello.get("daemon_pid") if self._agent else None
        if daemon != self._daemon_pid:
            why = ("the remote agent that ran it is gone too, so how it ended is unknown (it "
                   "ended while this client was away and the agent, left with nothing, exited; "
                   "or the host rebooted; or both were killed)")  # fmt: skip
        else:
            why = ("it ended while this client was away, longer ago than the remote agent "
                   "remembers exits")  # fmt: skip
        self.log.warning("Remote kernel %s is gone from %s: %s", self.kernel_id,
                         self.settings.target.describe(), why)  # fmt: skip
        self._set_exited(LOST)

    async def abandon(self) -> None:
        """Give up an unreachable kernel (the link is down): stop reconnecting and report it
        ended; it is stopped once its host answers again (or by its orphan_timeout there)."""
        if self._recovery is None or not self._running:
            return
        self.log.warning(
            "Remote kernel %s is unreachable; it is stopped once %s answers again, or by "
            "the host after orphan_timeout (%s s)", self.kernel_id,
            self.settings.target.host.label, self.settings.orphan_timeout,
        )  # fmt: skip
        self._recovery.cancel()
        self._late_stop = stop_when_reachable(self.site, self.settings, self.kernel_id, self.log)
        self._set_exited(LOST)
