"""Helpers for kernel tests: remote kernelspecs, clients, and the "nothing left behind" check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient

PROVISIONER = "remote-ssh-provisioner"


def remote_base(remote_tmp: Path) -> Path:
    """Where the remote agent puts kernel dirs for sessions whose TMPDIR is ``remote_tmp``."""
    return remote_tmp / f"jupyter-remote-{os.getuid()}"


def rk(
    *args: str, check: bool = True, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line (``remote_kernel ARGS``) as a user would; bounded."""
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter_remote_provisioner", *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, f"{args} failed: {proc.stdout}{proc.stderr}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The message of a command that failed as it should: exit status 1 and one line,
    ``remote_kernel: error: MESSAGE``, no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("remote_kernel: error: "), lines[0]
    return lines[0].removeprefix("remote_kernel: error: ")


async def wait_for_async(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """:func:`wait_for` on a running event loop: the loop keeps serving while it polls."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
    return value


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def write_spec(
    kernels_dir: Path,
    name: str,
    config: dict[str, Any],
    interrupt_mode: str = "signal",
    display_name: str | None = None,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write a remote kernelspec ``name`` into ``kernels_dir`` and return its name;
    ``metadata`` is added to its ``metadata`` (e.g. ``supported_encryption``)."""
    spec_dir = kernels_dir / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": argv or ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name or name,
        "language": "python",
        "interrupt_mode": interrupt_mode,
        "env": env or {},
        "metadata": {
            "kernel_provisioner": {"provisioner_name": PROVISIONER, "config": config},
            **(metadata or {}),
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return name


def run_cell(
    kc: BlockingKernelClient, code: str, timeout: float = 30
) -> tuple[str, dict[str, Any]]:
    """Execute ``code``; return (stdout text, execute_reply content)."""
    out: list[str] = []

    def on_output(msg: dict[str, Any]) -> None:
        if msg["header"]["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=on_output)
    return "".join(out), reply["content"]


def run_through_file(path: Path, code: str, timeout: float = 30) -> tuple[str, dict[str, Any]]:
    """Connect a fresh client with the connection file ``path``, run ``code``, disconnect;
    return (stdout text, execute_reply content), as ``jupyter console --existing`` would."""
    kc = BlockingKernelClient()
    kc.load_connection_file(str(path))
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
        return run_cell(kc, code, timeout)
    finally:
        kc.stop_channels()


def printed(kc: BlockingKernelClient, text: str) -> bool:
    """Whether the next iopub message (waiting up to 0.2 s) is a stream containing ``text``."""
    try:
        msg = kc.get_iopub_msg(timeout=0.2)
    except queue.Empty:
        return False
    return msg["header"]["msg_type"] == "stream" and text in msg["content"]["text"]


def interrupt_sleeping_cell(
    kc: BlockingKernelClient, interrupt: Callable[[], None]
) -> dict[str, Any]:
    """Run a long sleep, ``interrupt()`` it once it runs, and return its execute_reply.

    ipykernel ignores a SIGINT that lands between cells or before the cell's code runs, so
    the cell prints a marker first and is interrupted once: a lost interrupt fails the test.
    """
    msg_id = kc.execute("print('sleeping', flush=True); import time; time.sleep(60)")
    wait_for(lambda: printed(kc, "sleeping"), 10, "the cell to start sleeping")
    interrupt()
    try:
        reply: dict[str, Any] = kc.get_shell_msg(timeout=15)
    except queue.Empty:
        raise AssertionError("the interrupt did not end the cell within 15 s") from None
    assert reply["parent_header"]["msg_id"] == msg_id
    # as a user would, go on once the kernel is idle: requests that reach ipykernel while it
    # still handles the cell's error are aborted (stop_on_error), also for a local kernel
    wait_for(lambda: idle_after(kc, msg_id), 15, "the kernel to be idle after the interrupt")
    return reply


def idle_after(kc: BlockingKernelClient, msg_id: str) -> bool:
    """Whether the next iopub message (waiting up to 0.2 s) says idle after ``msg_id``."""
    try:
        msg = kc.get_iopub_msg(timeout=0.2)
    except queue.Empty:
        return False
    state = msg["content"].get("execution_state")
    return state == "idle" and msg["parent_header"].get("msg_id") == msg_id


def _listening_inodes() -> set[str]:
    """Inodes of TCP sockets in LISTEN state on this machine's namespace."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def own_sockets() -> set[str]:
    """Inodes of the sockets this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(link[8:-1])
    return found


def socket_kind(inode: str) -> str:
    """ "unix", "tcp", … for a socket inode of this machine (for messages)."""
    for table in ("unix", "tcp", "tcp6", "udp", "udp6", "netlink"):
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
            for line in f:
                fields = line.split()
                if inode in fields[6:10]:
                    return f"{table} {' '.join(fields[1:3]) if table != 'unix' else fields[-1]}"
    return "socket"


def own_listeners() -> set[str]:
    """Listening TCP sockets held by this process."""
    return own_sockets() & _listening_inodes()


def remote_processes(remote_tmp: Path) -> list[str]:
    """Command lines of processes started through the test sshds (their TMPDIR is remote_tmp)."""
    mark = f"TMPDIR={remote_tmp}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.append(f"{pid} " + f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


FAST = {"keepalive_interval": 1.0, "connect_timeout": 3.0}  # outages noticed within seconds
DAEMON_MARK = 'AGENT_MODE":"daemon'  # in the remote agent daemon's command line
RELAY_MARK = 'AGENT_MODE":"relay'  # in the command line of a relay (one per agent channel)


def relays(remote_tmp: Path) -> list[str]:
    """The remote relays (one per agent channel) still running: the daemon ends a client's
    relay when it drops the client."""
    return [p for p in remote_processes(remote_tmp) if RELAY_MARK in p]


def remote_kernels(remote_tmp: Path) -> list[int]:
    """Pids of the kernels running on the test hosts."""
    return [int(p.split()[0]) for p in remote_processes(remote_tmp) if "ipykernel" in p]


def remote_kernel_dirs(remote_tmp: Path) -> list[str]:
    base = remote_base(remote_tmp)
    return sorted(os.listdir(base)) if base.exists() else []


def remote_agent_files(remote_tmp: Path) -> list[str]:
    """The remote daemons' sockets, locks and logs (gone once the last daemon exits)."""
    agent_dir = Path(f"{remote_base(remote_tmp)}-agent")
    return sorted(os.listdir(agent_dir)) if agent_dir.exists() else []


def remote_job_dirs(remote_tmp: Path) -> list[str]:
    """The private roots of Slurm jobs' daemons (gone once the daemon exits)."""
    return sorted(p.name for p in remote_tmp.glob(f"jupyter-remote-{os.getuid()}-slurm*"))


def own_threads() -> set[str]:
    """This process's threads, by name and identity (a new thread with an old name counts)."""
    return {f"{t.name}#{t.ident}" for t in threading.enumerate()}


@dataclass
class Leftovers:
    """What a test started that is still there: sockets (listeners, SSH connections), threads,
    remote processes, kernel dirs and the daemon's files."""

    sockets: set[str]
    threads: set[str]
    remote_tmp: Path

    @classmethod
    def snapshot(cls, remote_tmp: Path) -> Leftovers:
        return cls(own_sockets(), own_threads(), remote_tmp)

    def assert_clean(self, timeout: float = 10, threads: bool = True) -> None:
        """Fail unless everything new since the snapshot is gone (waiting up to ``timeout``);
        ``threads=False`` where the test's remote host itself runs threads in this process
        (the demo host's asyncssh server starts executor threads as clients come)."""

        def new_items() -> dict[str, Any]:
            items = {
                # TCP only: listeners and SSH connections (event loops that jupyter_client
                # keeps for the process hold unnamed Unix socket pairs)
                "local sockets": {
                    kind
                    for kind in map(socket_kind, own_sockets() - self.sockets)
                    if kind.startswith("tcp")
                },
                "threads": own_threads() - self.threads if threads else set(),
                "remote processes": remote_processes(self.remote_tmp),
                "remote kernel dirs": remote_kernel_dirs(self.remote_tmp),
                "remote agent files": remote_agent_files(self.remote_tmp),
                "remote job dirs": remote_job_dirs(self.remote_tmp),
            }
            return {k: v for k, v in items.items() if v}

        try:
            wait_for(lambda: not new_items(), timeout, "cleanup")
        except AssertionError:
            raise AssertionError(f"left behind: {new_items()}") from None
