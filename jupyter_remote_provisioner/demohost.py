"""A throwaway SSH host on 127.0.0.1 (OpenSSH's sshd, else an embedded asyncssh server), so
the ``demo`` command needs no SSH server set up. :class:`DemoHost` owns its working directory:
it must be missing or empty at ``start()``; ``stop()`` deletes it (after ``detach()``, the user
does). It holds a fresh client key, known_hosts and an ssh_config ``Host`` block."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import asyncssh

from .errors import RemoteKernelError

MARKER_VAR = "JRP_DEMO_HOST"  # in every session's environment, to find what sessions start
LOOPBACK = "127.0.0.1"
_LINUX = os.uname().sysname == "Linux"
_LIBC = ctypes.CDLL(None, use_errno=True) if _LINUX else None  # loaded now: no dlopen after fork


def find_sshd() -> str | None:
    """OpenSSH's sshd as an absolute path (it refuses to run otherwise), or None."""
    return "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else shutil.which("sshd")


def generate_keypair(path: Path, comment: str | None = None) -> Path:
    """Write a new ed25519 key (OpenSSH format, 0600) and its ``.pub``; return ``path``."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment or path.name)
    for file, data in ((path, key.export_private_key()), (Path(f"{path}.pub"), b"")):
        file.unlink(missing_ok=True)
        with os.fdopen(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data or key.export_public_key())
    return path


def ssh_config_block(alias: str, options: dict[str, object]) -> str:
    """One ``Host`` block of an ssh_config file (values with spaces quoted)."""
    values = {k: f'"{v}"' if " " in str(v) else v for k, v in options.items()}
    return f"Host {alias}\n" + "".join(f"    {k} {v}\n" for k, v in values.items())


def sshd_config_lines(
    port: int, listen: str, host_key: Path, authorized_keys: Path, pid_file: Path,
    session_env: dict[str, str],
) -> list[str]:  # fmt: skip
    """An sshd_config for a private sshd: own keys, one address, forwarding on, no passwords."""
    return [
        f"Port {port}", f"ListenAddress {listen}", f'HostKey "{host_key}"',
        f'PidFile "{pid_file}"', f'AuthorizedKeysFile "{authorized_keys}"',
        "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
        "AllowStreamLocalForwarding yes", "MaxSessions 10", "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",  # for scp and sftp (bench/bench_sync.py compares)
        "SetEnv " + " ".join(f"{k}={v}" for k, v in session_env.items()),
    ]  # fmt: skip


def wait_listening(proc: subprocess.Popen[bytes], log: Path, offset: int, timeout: float) -> str:
    """Wait (bounded) until sshd logs "Server listening": "" then, else its last 5 log lines."""
    deadline = time.monotonic() + timeout
    while True:
        with log.open("rb") as f:
            f.seek(offset)  # sshd -e ends lines with CRLF
            text = f.read().decode(errors="replace")
        if "Server listening" in text:
            return ""
        if proc.poll() is not None or time.monotonic() > deadline:
            return " | ".join(text.splitlines()[-5:]) or "no output"
        time.sleep(0.02)


def session_pids(marker: str, sshd: int | None = None) -> list[int]:
    """Processes with ``MARKER_VAR=marker`` in their environment, and all below ``sshd``."""
    needle, children, found = f"{MARKER_VAR}={marker}".encode(), dict[int, list[int]](), []
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()] if _LINUX else []:
        with contextlib.suppress(OSError, IndexError):
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
    todo = list(children.get(sshd, [])) if sshd else []
    while todo:
        found.append(child := todo.pop())
        todo += children.get(child, [])
    return sorted(set(found))


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for a server to bind right after)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def kill_pids(pids: list[int], grace: float = 0.0) -> None:
    """SIGTERM and wait up to ``grace`` s (if > 0), then SIGKILL; wait (bounded) until gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids if wait else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.02)


async def _copy(source: Any, sink: Any, close: bool = False) -> None:
    """Copy until EOF; output outlives a closed channel. Not ``SSHServerProcess.redirect``:
    asyncssh 2.24 reads an asyncio stream twice at once after a pause, breaking big inputs."""
    with contextlib.suppress(OSError, asyncssh.Error):  # a lost channel is EOF for stdin
        while data := await source.read(65536):
            with contextlib.suppress(OSError, asyncssh.Error):
                sink.write(data)
                await sink.drain()
    if close:
        sink.close()


class _Server(asyncssh.SSHServer):  # the embedded server's policy
    def begin_auth(self, username: str) -> bool:
        if username != pwd.getpwuid(os.getuid()).pw_name:
            raise asyncssh.PermissionDenied(f"user {username} may not log in to the demo host")
        return True  # then authorized_client_keys decides

    def connection_requested(self, dest_host: str, *_: object) -> bool:
        return dest_host in (LOOPBACK, "localhost", "::1")

    def unix_connection_requested(self, dest_path: str) -> bool:
        return True


class DemoHost:
    """A throwaway SSH host on 127.0.0.1 for the current user; see the module docstring."""

    def __init__(
        self, workdir: Path, backend: str = "auto", alias: str = "demo-host",
        session_env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        if backend not in ("auto", "openssh", "asyncssh"):
            raise ValueError(f"unknown backend {backend!r}; use auto, openssh or asyncssh")
        self.backend = backend if backend != "auto" else ("openssh" if find_sshd() else "asyncssh")
        self.workdir = Path(workdir).absolute()
        self.alias, self.host, self.port = alias, LOOPBACK, 0
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.identity_file, self.known_hosts, self.ssh_config, self.log = (
            self.workdir / name for name in ("id_ed25519", "known_hosts", "ssh_config", "sshd.log")
        )
        self.marker = uuid.uuid4().hex  # the value of MARKER_VAR
        # HOME is the workdir: sessions run none of the user's shell startup files (faster,
        # and a throwaway host should not depend on them); kernels start there too.
        home = {"HOME": str(self.workdir)}
        self.session_env = {**home, **(session_env or {}), MARKER_VAR: self.marker}
        self.pid: int | None = None  # the sshd's; None for the embedded server
        self.detached = self._owns_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None  # the embedded server's
        self._stopping = threading.Event()
        self._conns: list[asyncssh.SSHServerConnection] = []  # once authenticated

    def __enter__(self) -> DemoHost:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write keys and client files, start the server and wait (bounded) until it listens."""
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise RemoteKernelError(f"the demo host's directory {self.workdir} is not empty")
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._owns_workdir = True
        try:
            generate_keypair(self.identity_file, f"{self.alias}-client")
            host_key = generate_keypair(self.workdir / "ssh_host_ed25519_key", self.alias)
            if self.backend == "openssh":
                self.port = free_port()
                # PDEATHSIG fires when the spawning *thread* exits: tie it from the main one only.
                self._start_sshd(threading.current_thread() is threading.main_thread())
            else:
                ready: Future[int] = Future()
                serve = (self._serve(host_key, ready),)
                self._thread = threading.Thread(target=asyncio.run, args=serve, daemon=True)
                self._thread.start()
                self.port = ready.result(10.0)
            host_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
            self.known_hosts.write_text(f"[{self.host}]:{self.port} {host_pub}\n")
            options = {"HostName": self.host, "Port": self.port, "User": self.user}
            options |= {"IdentityFile": self.identity_file, "IdentitiesOnly": "yes"}
            options |= {"UserKnownHostsFile": self.known_hosts, "StrictHostKeyChecking": "yes"}
            self.ssh_config.write_text(ssh_config_block(self.alias, options))
        except BaseException:
            self.stop()
            raise

    def _start_sshd(self, die_with_parent: bool) -> None:
        if (sshd := find_sshd()) is None:
            raise RemoteKernelError("sshd is not installed; use the asyncssh backend instead")
        config, pid_file = self.workdir / "sshd_config", self.workdir / "sshd.pid"
        host_key, pub = self.workdir / "ssh_host_ed25519_key", Path(f"{self.identity_file}.pub")
        lines = sshd_config_lines(self.port, self.host, host_key, pub, pid_file, self.session_env)
        config.write_text("\n".join([*lines, f"AllowUsers {self.user}"]) + "\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        offset = self.log.stat().st_size if self.log.exists() else 0
        libc = _LIBC if die_with_parent else None
        tie = (lambda: libc.prctl(1, signal.SIGTERM)) if libc else None  # PDEATHSIG
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=tie,  # noqa: PLW1509 - async-signal-safe enough: one prctl call
            )  # fmt: skip
        self.pid = self._proc.pid
        if tail := wait_listening(self._proc, self.log, offset, 10.0):
            raise RemoteKernelError(f"the demo sshd on port {self.port} did not start: {tail}")

    async def _serve(self, host_key: Path, ready: Future[int]) -> None:
        """The embedded server's thread: listen, serve until stop(), then clean up."""
        try:
            acceptor = await asyncssh.listen(
                self.host, 0, server_factory=_Server, server_host_keys=[str(host_key)],
                authorized_client_keys=f"{self.identity_file}.pub", acceptor=self._conns.append,
                process_factory=self._run, encoding=None, allow_pty=False, agent_forwarding=False,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - start() raises it
            return ready.set_exception(exc)
        ready.set_result(acceptor.get_port())
        await asyncio.to_thread(self._stopping.wait)
        acceptor.close()
        for conn in self._conns:
            conn.close()
        await asyncio.to_thread(lambda: kill_pids(session_pids(self.marker), 3.0))

    async def _run(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """One session as sshd runs it: ``$SHELL -c COMMAND`` (or ``$SHELL``), a new session."""
        pw = pwd.getpwuid(os.getuid())
        shell = pw.pw_shell if os.access(pw.pw_shell, os.X_OK) else "/bin/sh"
        peer, sock = process.get_extra_info("peername"), process.get_extra_info("sockname")
        env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": shell}
        env |= {"PATH": os.environ.get("PATH", os.defpath), **self.session_env}
        env["SSH_CONNECTION"] = f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}"
        args = ["-c", process.command] if process.command else []
        proc = await asyncio.create_subprocess_exec(
            shell, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=env["HOME"], start_new_session=True,
        )  # fmt: skip
        asyncio.ensure_future(_copy(process.stdin, proc.stdin, close=True))  # ends with channel
        await asyncio.gather(_copy(proc.stdout, process.stdout), _copy(proc.stderr, process.stderr))
        status = await proc.wait()
        with contextlib.suppress(OSError, asyncssh.Error):
            if status < 0:
                return process.exit_with_signal(signal.Signals(-status).name[3:])
            process.exit(status)

    def stop(self) -> None:
        """Stop the server, kill what its sessions started, delete the working directory."""
        if self.detached:
            return
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(20)
        sshd = [self.pid] if self._proc and self.pid else []
        kill_pids(sshd + session_pids(self.marker, *sshd), grace=3.0)
        if self._proc is not None:
            self._proc.wait(timeout=5)  # reap it
        self._proc, self.pid = None, None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def detach(self) -> None:
        """Keep the sshd running after this process exits (``demo --keep``); openssh only: it
        restarts (same port and host key; sessions survive) without its PDEATHSIG tie."""
        if self.backend != "openssh" or self._proc is None:
            raise RemoteKernelError("only a running OpenSSH demo host can be kept running")
        self._proc.terminate()
        self._proc.wait(timeout=5)
        self._start_sshd(die_with_parent=False)
        self.detached = True

    def describe_kept(self) -> str:
        """How the user reaches, and later stops, a detached host."""
        config, workdir = shlex.quote(str(self.ssh_config)), shlex.quote(str(self.workdir))
        return (
            f"The demo SSH host keeps running: sshd (pid {self.pid}) on {self.host}:{self.port}; "
            f"reach it with `ssh -F {config} {self.alias}`.\nStop it and delete its keys with: "
            f"kill {self.pid} && rm -r {workdir}"
        )
