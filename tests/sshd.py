"""Helpers that run a real OpenSSH sshd for the tests (no pytest fixtures here).

Keys, the sshd_config and the wait for "Server listening" are the demo host's
(``jupyter_remote_provisioner.demohost``), so the tests and ``demo`` share one implementation.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from jupyter_remote_provisioner.demohost import (
    free_port,
    generate_keypair,
    kill_pids,
    pid_alive,  # noqa: F401 - part of this module's API (tests)
    ssh_config_block,  # noqa: F401 - part of this module's API (conftest, bench)
    sshd_config_lines,
    wait_listening,
)

if TYPE_CHECKING:
    from netns import Topology

SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless run by absolute path
MARKER_VAR = "JRP_TEST_SSHD"  # set in every session, so spawned processes can be found


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded up front: no dlopen after fork


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM it if the test process dies (PR_SET_PDEATHSIG)."""
    _LIBC.prctl(1, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def require_tools(*names: str) -> None:
    """Fail the test loudly when a required executable is missing."""
    missing = [n for n in names if shutil.which(n) is None and not os.access(n, os.X_OK)]
    if missing:
        pytest.fail(f"required tool(s) not installed: {', '.join(missing)}", pytrace=False)


def current_user() -> str:
    """Name of the user running the tests (from the uid, not the environment)."""
    return pwd.getpwuid(os.getuid()).pw_name


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (closed connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _tcp_inodes(pid: int, host: str, port: int) -> set[str]:
    """Inodes of connected (non-listening) TCP sockets at host:port, in pid's netns."""
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    fields = [line.split() for line in lines]
    return {f[9] for f in fields if f[1] == local and f[3] != "0A"}  # 0A = LISTEN


class SshServer:
    """A real sshd on its own host key, run as the current user, optionally in a netns."""

    def __init__(
        self,
        workdir: Path,
        authorized_keys: Path,
        listen_address: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        extra_config: list[str] | None = None,
        session_env: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        self.session_env = {MARKER_VAR: uuid.uuid4().hex, **(session_env or {})}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = listen_address
        self.port = port if port is not None else free_port()
        self.netns = netns
        self.marker = self.session_env[MARKER_VAR]
        self.host_key = generate_keypair(self.dir / "ssh_host_ed25519_key")
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.pid_file = self.dir / "sshd.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config(authorized_keys.resolve(), extra_config or [])

    def _write_config(self, authorized_keys: Path, extra: list[str]) -> None:
        lines = [
            *sshd_config_lines(
                self.port,
                self.host,
                self.host_key,
                authorized_keys,
                self.pid_file,
                self.session_env,
            ),
            *extra,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def host_public_key(self) -> str:
        """The host key as ``ssh-ed25519 AAAA...`` (no comment)."""
        kind, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"{kind} {blob}"

    def known_hosts_line(self, name: str | None = None) -> str:
        """A known_hosts line for ``name`` or for this server's ``[host]:port``."""
        if name is None:
            name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return f"{name} {self.host_public_key}\n"

    def log_text(self) -> str:
        """Everything sshd has logged so far (all starts)."""
        return self._log_bytes().decode(errors="replace").replace("\r\n", "\n")

    def _log_bytes(self, offset: int = 0) -> bytes:
        """The raw log from byte ``offset`` (sshd -e ends lines with CRLF)."""
        if not self.log.exists():
            return b""
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read()

    def _argv(self) -> list[str]:
        argv = [SSHD, "-D", "-e", "-f", str(self.config)]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self) -> None:
        """Launch sshd and wait (bounded) until it listens; raise with the log otherwise."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("sshd already running")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # PDEATHSIG fires when the spawning *thread* exits: only from the main thread.
                preexec_fn=_die_with_parent if _in_main_thread() else None,  # noqa: PLW1509
            )
        tail = wait_listening(self.proc, self.log, offset, timeout=10)
        if tail:
            self.stop()
            raise RuntimeError(f"sshd on {self.host}:{self.port} did not start: {tail}")

    def stop(self) -> None:
        """Stop the listener only; established sessions survive, as on a real restart."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start again on the same port and host key."""
        self.stop()
        self.start()

    def session_pids(self) -> list[int]:
        """Per-connection sshd processes: sshd processes holding a connection to us."""
        pids = []
        for pid in _all_pids():
            try:
                if os.readlink(f"/proc/{pid}/exe") != SSHD:
                    continue
            except OSError:
                continue
            if _socket_inodes(pid) & _tcp_inodes(pid, self.host, self.port):
                pids.append(pid)
        return pids

    def spawned_pids(self) -> list[int]:
        """Processes started through this server's sessions (they carry its marker)."""
        needle = f"{MARKER_VAR}={self.marker}".encode()
        pids = []
        for pid in _all_pids():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def kill_all_sessions(self) -> None:
        """SIGKILL every per-connection sshd process: all clients lose their connection."""
        kill_pids(self.session_pids())

    def kill_spawned(self) -> None:
        """Kill every process started through this server's sessions (SIGTERM, then SIGKILL)."""
        kill_pids(self.spawned_pids(), grace=2)

    def close(self) -> None:
        """Stop the listener, drop all sessions and kill what they started."""
        self.stop()
        self.kill_all_sessions()
        self.kill_spawned()


@dataclass
class SshEnv:
    """A loopback sshd plus the client files needed to reach it as ``alias``."""

    server: SshServer
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    ssh_config: Path
    alias: str
    dir: Path


@dataclass
class JumpEnv:
    """A bastion and a target reachable only through it, with client files."""

    topology: Topology
    bastion: SshServer
    target: SshServer
    identity_file: Path
    known_hosts: Path
    ssh_config: Path
    user: str
    dir: Path


def ssh_cmd(env: SshEnv | JumpEnv, alias: str) -> list[str]:
    """An ``ssh`` argv (append the remote command) for ``alias`` in env's ssh_config."""
    return [
        "ssh",
        "-F",
        str(env.ssh_config),
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        alias,
    ]
