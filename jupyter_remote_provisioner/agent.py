"""The local end of the remote agent (package ``remote``), spoken over one SSH exec channel.

The agent is a stdlib-only Python program sent as the channel's first bytes. It launches
kernels detached in their own process groups, delivers signals, reports exits and removes
kernel files. The protocol is JSON lines: requests ``{"id", "op", ...}``, replies
``{"re", "ok", ...}`` and events ``{"event", ...}``. One agent serves every kernel of one
interpreter on one connection, so kernels cost no SSH session (sshd's MaxSessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import shlex
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncssh

from .errors import LaunchError
from .remote.job import SESSION_PID

if TYPE_CHECKING:
    from .ssh import Connection

log = logging.getLogger(__name__)

# Reads the bundle (a length line, then the bytes) and runs it in one of its modes.
BOOTSTRAP = (
    "import sys;n=int(sys.stdin.buffer.readline());s=sys.stdin.buffer.read(n);"
    'exec(compile(s,"jrp-agent","exec"),{"__name__":"__main__","AGENT_SOURCE":s,'
    '"AGENT_MODE":"%s"})'
)
EXIT_COMMAND_NOT_FOUND = 127
STDERR_TAIL = 2000
# The daemon drops a client silent for this many keepalive intervals (its link is dead),
# which orphans that client's kernels even when sshd has not noticed the dead link.
SILENT_INTERVALS = 4

# Called with (exit status, tail of the kernel's output); status None: the agent was lost.
ExitCallback = Callable[[int | None, str], None]


# The bundle: the remote/ modules, an importer serving them as package ``jrp_agent``, and
# the call of its entry point in the mode the bootstrap set: relay, daemon (started by the
# relay) or sync.
BUNDLE = """import importlib.abc, importlib.util, sys
SOURCES = %r
class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        short = name[len("jrp_agent."):] if name.startswith("jrp_agent.") else "__init__"
        if (name == "jrp_agent" or name.startswith("jrp_agent.")) and short in SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=name == "jrp_agent")
        return None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        short = module.__name__[len("jrp_agent."):] or "__init__"
        code = compile(SOURCES[short], "jrp_agent/" + short + ".py", "exec")
        exec(code, module.__dict__)
sys.meta_path.insert(0, Finder())
import jrp_agent
jrp_agent.run(AGENT_SOURCE, globals().get("AGENT_MODE", "relay"))
"""


@functools.cache
def agent_source() -> bytes:
    """The remote agent program, as sent to the remote interpreter: one ASCII bundle."""
    package = resources.files(__package__).joinpath("remote")
    sources = {
        item.name[: -len(".py")]: item.read_text("ascii")
        for item in sorted(package.iterdir(), key=lambda item: item.name)
        if item.name.endswith(".py")
    }
    return (BUNDLE % (sources,)).encode("ascii")


@functools.cache
def bootstrap_input() -> bytes:
    """What the bootstrap reads on stdin first: the bundle's length, a newline, the bundle."""
    source = agent_source()
    return b"%d\n" % len(source) + source


def remote_command(python: str, mode: str = "relay", launcher: tuple[str, ...] = ()) -> str:
    """The exec command running the bundle's ``mode`` on ``python`` (``~/`` expanded
    remotely), through ``launcher`` (e.g. ``srun …``: arguments of its own) when given."""
    if python.startswith("~/"):
        interpreter = '"$HOME"/' + shlex.quote(python[2:])
    else:
        interpreter = shlex.quote(python)
    prefix = "".join(shlex.quote(arg) + " " for arg in launcher)
    # through a launcher the agent runs elsewhere; it learns which sshd session it came from
    session = f"{SESSION_PID}=$PPID " if launcher else ""
    return f"{session}exec {prefix}{interpreter} -c {shlex.quote(BOOTSTRAP % mode)}"


def start_failure(
    python: str, host_label: str, exit_status: int | None, stderr: str
) -> LaunchError:
    """Why the remote interpreter ended before the bundle said hello, as a one-line error."""
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    if exit_status == EXIT_COMMAND_NOT_FOUND:
        return LaunchError(
            f"remote python {python!r} was not found on {host_label}; set `python` in the "
            f"kernelspec to the full path of an interpreter that exists there"
        )
    return LaunchError(
        f"remote python {python} on {host_label} failed to start "
        f"(exit status {exit_status}): {tail or 'no error output'}"
    )


class AgentError(Exception):
    """The agent answered ``ok: false``; ``reply`` holds its fields."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("error", "remote agent request failed"))
        self.reply = reply


class AgentLost(Exception):
    """The agent's channel closed before it answered."""


class _Session(asyncssh.SSHClientSession[bytes]):
    def __init__(self, agent: RemoteAgent) -> None:
        self._agent = agent
        self._buffer = b""

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        """The channel is open: the bundle and the first requests go right behind the exec
        request.

        asyncssh calls this, then sends the exec request without yielding to the loop, so
        what is written from a callback scheduled here follows the request on the wire
        instead of waiting one round trip for its reply (sshd runs the command before it
        reads the next packet, as for OpenSSH's own client). Every kernel start in the
        tests would fail if that changed.
        """
        self._agent._channel = chan
        asyncio.get_running_loop().call_soon(self._agent._exec_sent)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._agent.stderr = (self._agent.stderr + data.decode(errors="replace"))[-STDERR_TAIL:]
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._agent.dispatch(line)

    def exit_status_received(self, status: int) -> None:
        self._agent.exit_status = status

    def connection_lost(self, exc: Exception | None) -> None:
        self._agent.channel_closed(link_lost=exc is not None)


class RemoteAgent:
    """One running remote agent: send requests, await replies, receive kernel exits."""

    def __init__(self, python: str, host_label: str, launcher: tuple[str, ...] = ()) -> None:
        self.python = python
        self.launcher = launcher
        self.host_label = host_label
        self.hello: dict[str, Any] = {}
        self.stderr = ""
        self.fatal = ""  # why the agent gave up, in its own words (its "fatal" event)
        self.link_lost = False  # the channel closed because the SSH connection did
        self.exit_status: int | None = None
        self.closed = asyncio.Event()
        self._channel: asyncssh.SSHClientChannel[bytes] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._exit_callbacks: dict[str, ExitCallback] = {}
        self._hello = asyncio.get_running_loop().create_future()
        self._opened = asyncio.get_running_loop().create_future()  # exec request sent
        self._keepalive: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        conn: asyncssh.SSHClientConnection,
        python: str,
        host_label: str,
        timeout: float,
        keepalive_interval: float,
        mode: str = "relay",
        launcher: tuple[str, ...] = (),
    ) -> RemoteAgent:
        """Run the agent with ``python`` on ``conn``, wait for its hello, start keepalives."""
        agent = await cls.open(conn, python, host_label, keepalive_interval, mode, launcher)
        await agent.ready(timeout)
        return agent

    @classmethod
    async def open(
        cls,
        conn: asyncssh.SSHClientConnection,
        python: str,
        host_label: str,
        keepalive_interval: float,
        mode: str = "relay",
        launcher: tuple[str, ...] = (),
    ) -> RemoteAgent:
        """Run the agent with ``python`` on ``conn`` (in ``mode``, through ``launcher``) and
        start keepalives, as soon as the exec request is sent: requests written meanwhile
        follow the bundle in the channel, so neither the exec's reply nor the agent's hello
        costs a round trip before them. :meth:`ready` says whether the agent did start."""
        agent = cls(python, host_label, launcher)
        command = remote_command(python, mode, launcher)
        session = asyncio.ensure_future(
            conn.create_session(lambda: _Session(agent), command, encoding=None)
        )
        try:
            await asyncio.wait([session, agent._opened], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            session.cancel()
            raise
        if session.done():
            session.result()  # the session was refused: raise why
        session.add_done_callback(agent._exec_answered)
        if keepalive_interval > 0:
            agent._keepalive = asyncio.ensure_future(agent._send_keepalives(keepalive_interval))
        return agent

    def _exec_sent(self) -> None:
        """Right behind the exec request: the bundle, then whatever requests are waiting."""
        self._write(bootstrap_input())
        if not self._opened.done():
            self._opened.set_result(None)

    def _exec_answered(self, session: asyncio.Future[Any]) -> None:
        """The exec request's reply: a refusal closes the channel, and says why."""
        if not session.cancelled() and session.exception() is not None:
            reason = getattr(session.exception(), "reason", "") or "refused"
            self.stderr += f"the SSH server did not run it: {reason}"

    async def ready(self, timeout: float) -> dict[str, Any]:
        """The agent's hello (its python, ipykernel, client id), or a LaunchError that says
        why it did not start within ``timeout`` seconds."""
        try:
            self.hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise LaunchError(
                f"remote python {self.python} on {self.host_label} did not start within "
                f"{timeout:g} s"
            ) from None
        except AgentLost:
            raise self._start_failure() from None
        return self.hello

    async def _send_keepalives(self, interval: float) -> None:
        """One line every ``interval`` s, so the remote side can tell a dead link."""
        while self._channel is not None and not self.closed.is_set():
            line = {"id": next(self._ids), "op": "keepalive", "within": SILENT_INTERVALS * interval}
            self._write(json.dumps(line).encode() + b"\n")  # its reply is ignored
            await asyncio.sleep(interval)

    def _start_failure(self) -> LaunchError:
        """The agent's own reason when it gave one (python ran: the reason is not python's;
        it also wrote it to stderr, so stderr is not repeated), else python's failure."""
        if self.fatal:
            return LaunchError(f"the remote agent on {self.host_label} cannot start: {self.fatal}")
        if self.launcher and self.exit_status != EXIT_COMMAND_NOT_FOUND:
            tail = " | ".join(self.stderr.strip().splitlines()[-3:]) or "no error output"
            return LaunchError(
                f"`{self.launcher[0]}` could not run the remote agent on {self.host_label} "
                f"(exit status {self.exit_status}): {tail}"
            )
        return start_failure(self.python, self.host_label, self.exit_status, self.stderr)

    async def request(
        self, op: str, reply_timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one request; return its reply or raise AgentError / AgentLost / TimeoutError."""
        reply = await asyncio.wait_for(self.send(op, **fields), reply_timeout)
        if not reply.get("ok"):
            raise AgentError(reply)
        return reply

    def send(self, op: str, **fields: Any) -> asyncio.Future[dict[str, Any]]:
        """Send one request without waiting: the future gets its reply (``ok`` true or false),
        or AgentLost if the channel closes first. Raises AgentLost if it cannot be sent."""
        if self.closed.is_set() or self._channel is None:
            raise AgentLost(f"the remote agent on {self.host_label} is gone")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not self._write(json.dumps({"id": request_id, "op": op, **fields}).encode() + b"\n"):
            raise AgentLost(f"the remote agent on {self.host_label} is gone")
        self._pending[request_id] = future
        future.add_done_callback(lambda _: self._pending.pop(request_id, None))
        return future

    def _write(self, data: bytes) -> bool:
        """Write to the channel; False if it is already closing (its close is on its way)."""
        assert self._channel is not None
        try:
            self._channel.write(data)
        except (BrokenPipeError, asyncssh.Error):
            return False
        return True

    def on_exit(self, kernel: str, callback: ExitCallback | None) -> None:
        """Call ``callback(status, log_tail)`` when ``kernel`` exits (None to stop watching)."""
        if callback is None:
            self._exit_callbacks.pop(kernel, None)
        else:
            self._exit_callbacks[kernel] = callback

    def dispatch(self, line: bytes) -> None:
        """Route one line from the agent: a reply, the hello, or an event."""
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("remote agent on %s sent a malformed line", self.host_label)
            return
        if "re" in message:
            future = self._pending.get(message["re"])
            if future is not None and not future.done():
                future.set_result(message)
            return
        event = message.get("event")
        if event == "hello" and not self._hello.done():
            self.hello = message  # before any reply: requests may have been sent already
            self._hello.set_result(message)
        elif event == "exited":
            callback = self._exit_callbacks.pop(str(message.get("kernel")), None)
            if callback is not None:
                callback(int(message.get("status", -1)), message.get("log_tail") or "")
        elif event == "fatal":
            self.fatal = str(message.get("error", ""))
        elif event == "log":
            log.info("remote agent on %s: %s", self.host_label, message.get("message"))

    def channel_closed(self, link_lost: bool = False) -> None:
        """The channel is gone (with the SSH connection when ``link_lost``, else the agent
        ended it): fail every waiter and tell every watched kernel."""
        self.link_lost = link_lost
        self.closed.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self._hello.done():
            self._hello.set_exception(AgentLost())
            self._hello.exception()
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(AgentLost(f"the remote agent on {self.host_label} is gone"))
        callbacks, self._exit_callbacks = self._exit_callbacks, {}
        for callback in callbacks.values():
            callback(None, "")

    async def close(self) -> None:
        """End the agent by closing its stdin; it stops its kernels and removes their files."""
        if self._channel is not None and not self.closed.is_set():
            with contextlib.suppress(BrokenPipeError, asyncssh.Error):
                self._channel.write_eof()
            try:
                await asyncio.wait_for(self.closed.wait(), 5)
            except asyncio.TimeoutError:
                self._channel.close()


async def shared_agent(
    conn: Connection,
    python: str,
    host_label: str,
    keepalive_interval: float,
    mode: str = "relay",
    launcher: tuple[str, ...] = (),
) -> RemoteAgent:
    """The connection's agent for ``python`` (run in ``mode`` through ``launcher``), started
    once and shared by its kernels."""
    key = ("agent", python, mode, launcher)
    existing: asyncio.Future[RemoteAgent] | None = conn.resources.get(key)
    pending: asyncio.Future[RemoteAgent]
    if existing is None or _unusable(existing):
        assert conn.ssh is not None
        pending = asyncio.ensure_future(
            RemoteAgent.open(conn.ssh, python, host_label, keepalive_interval, mode, launcher)
        )
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
