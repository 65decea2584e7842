"""A throwaway SSH host on 127.0.0.1 (OpenSSH's sshd, else an embedded asyncssh server), so
the ``demo`` command needs no SSH server set up. :class:`DemoHost` owns its working directory:
it must be missing or empty at ``start()``; ``stop()`` deletes it (after ``detach()``, the user
does). It holds a fresh client key, known_hosts and an ssh_config ``Host`` block.

The host runs the remote side on this machine, so it needs what the remote side needs: a
POSIX system (Linux or macOS). It finds its sessions' processes through ``/proc`` where there
is one (Linux), else through ``ps`` (macOS); only Linux ties the sshd to this process's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import asyncssh

from .errors import RemoteKernelError

if sys.platform != "win32":  # like the remote side it runs, the host is POSIX-only
    import pwd

    KILL, STOP_SIGNALS = signal.SIGKILL, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
else:
    KILL, STOP_SIGNALS = signal.SIGTERM, (signal.SIGTERM, signal.SIGINT)

MARKER_VAR = "JRP_DEMO_HOST"  # in every session's environment, to find what sessions start
KEPT_ENV_VAR = "JRP_DEMO_KEPT_ENV"  # a kept embedded host's session environment (JSON)
LOOPBACK = "127.0.0.1"
PROC = Path("/proc")  # Linux; elsewhere ``ps`` lists processes
# for PR_SET_PDEATHSIG (Linux only), loaded now: no dlopen after fork
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def account() -> tuple[str, str, str]:
    """This process's user name, home directory and login shell (from its uid); the host
    logs in only this user. Not on Windows: the remote side it runs is POSIX-only."""
    if sys.platform != "win32":
        entry = pwd.getpwuid(os.getuid())
        return entry.pw_name, entry.pw_dir, entry.pw_shell
    raise RemoteKernelError("the demo host needs Linux or macOS")


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
    needle, children, found = f"{MARKER_VAR}={marker}", dict[int, list[int]](), []
    for pid, ppid, environment in _processes():
        if needle in environment:
            found.append(pid)
        children.setdefault(ppid, []).append(pid)
    todo = list(children.get(sshd, [])) if sshd else []
    while todo:
        found.append(child := todo.pop())
        todo += children.get(child, [])
    return sorted(set(found))


def _processes() -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, environment entries) of every process we may see."""
    if not PROC.is_dir():  # macOS: ps prints the environment after the command (e)
        argv = ["ps", "axeww", "-o", "pid=,ppid=,command="]
        lines = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        rows = [line.split() for line in lines.stdout.splitlines()]
        return [(int(r[0]), int(r[1]), r[2:]) for r in rows if len(r) > 1 and r[0].isdigit()]
    table = []
    for pid in [int(p) for p in os.listdir(PROC) if p.isdigit()]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            environment = (PROC / str(pid) / "environ").read_bytes().decode(errors="replace")
            ppid = int(_proc_stat(pid)[1])
            table.append((pid, ppid, environment.split("\0")))
    return table


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, ppid, ..."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    if not PROC.is_dir():
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                               text=True, timeout=30, check=False).stdout.strip()  # fmt: skip
        return bool(state) and not state.startswith("Z")
    with contextlib.suppress(OSError, IndexError):
        return _proc_stat(pid)[0] != "Z"
    return False


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for a server to bind right after)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def kill_pids(pids: list[int], grace: float = 0.0) -> None:
    """SIGTERM and wait up to ``grace`` s (if > 0), then SIGKILL; wait (bounded) until gone."""
    for sig, wait in ((signal.SIGTERM, grace), (KILL, 5.0)):
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
        if username != account()[0]:
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
        self.user = account()[0]
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
        if sys.platform != "win32" and os.geteuid() == 0:
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

    async def _serve(self, host_key: Path, ready: Future[int], port: int = 0) -> None:
        """The embedded server's thread: listen, serve until stop(), then clean up."""
        try:
            acceptor = await asyncssh.listen(
                self.host, port, server_factory=_Server, server_host_keys=[str(host_key)],
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
        name, home, shell = account()
        shell = shell if os.access(shell, os.X_OK) else "/bin/sh"
        peer, sock = process.get_extra_info("peername"), process.get_extra_info("sockname")
        env = {"HOME": home, "USER": name, "LOGNAME": name, "SHELL": shell}
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
        self._stop_thread()
        sshd = [self.pid] if self._proc and self.pid else []
        kill_pids(sshd + session_pids(self.marker, *sshd), grace=3.0)
        if self._proc is not None:
            self._proc.wait(timeout=5)  # reap it
        self._proc, self.pid = None, None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_thread(self) -> None:
        """End the embedded server's thread (which ends its sessions), if it runs."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(20)
            self._thread = None

    def detach(self) -> None:
        """Keep the host running after this process exits (``demo --keep``), on the same port
        with the same keys: the sshd restarts without its PDEATHSIG tie (sessions survive);
        the embedded server moves to a process of its own (its sessions end)."""
        if self._proc is None and self._thread is None:
            raise RemoteKernelError("the demo host is not running; start it first")
        if self.backend == "openssh" and self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
            self._start_sshd(die_with_parent=False)
        else:
            self._stop_thread()
            self._start_kept_server()
        self.detached = True

    def _start_kept_server(self) -> None:
        """Run the embedded server in a process of its own (``main`` below), in a new session,
        and wait (bounded) until it listens."""
        argv = [sys.executable, "-m", __name__, str(self.workdir), str(self.port)]
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, KEPT_ENV_VAR: json.dumps(self.session_env)}
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.pid = self._proc.pid
        if tail := wait_listening(self._proc, self.log, offset, 20.0):
            raise RemoteKernelError(f"the kept demo host on port {self.port} did not start: {tail}")

    def describe_kept(self) -> str:
        """How the user reaches, and later stops, a detached host."""
        config, workdir = shlex.quote(str(self.ssh_config)), shlex.quote(str(self.workdir))
        server = "sshd" if self.backend == "openssh" else "embedded asyncssh server"
        return (
            f"The demo SSH host keeps running: {server} (pid {self.pid}) on "
            f"{self.host}:{self.port}; reach it with `ssh -F {config} {self.alias}`.\n"
            f"Stop it and delete its keys with: kill {self.pid} && rm -rf {workdir}"
        )


def main(argv: list[str]) -> int:
    """``python -m jupyter_remote_provisioner.demohost WORKDIR PORT``: a kept embedded demo
    host, in the foreground until SIGTERM, SIGINT or SIGHUP; then its sessions' processes
    end. :meth:`DemoHost.detach` starts it, with the sessions' environment in KEPT_ENV_VAR."""
    session_env = json.loads(os.environ.pop(KEPT_ENV_VAR))
    host = DemoHost(Path(argv[0]), backend="asyncssh", session_env=session_env)
    host.marker, host.port = session_env[MARKER_VAR], int(argv[1])
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: host._stopping.set())
    ready: Future[int] = Future()
    ready.add_done_callback(
        lambda _: print(f"Server listening on {host.host} port {host.port}.", flush=True)
    )
    asyncio.run(host._serve(host.workdir / "ssh_host_ed25519_key", ready, host.port))
    return 0 if ready.done() and ready.exception() is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
