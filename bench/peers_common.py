"""What both peer benchmarks share: figures, sshpyk set-up and clean-up, starts, output.

``bench_peers.py`` runs either the loopback comparison (``peers_loopback.py``) or the jump
topology (``peers_jump.py`` with ``topology.py``); both use these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bk  # also puts tests/ on sys.path
from bench_kernels import (
    SHUTDOWN_TIMEOUT,
    TOTAL_TIMEOUT,
    Kernels,
    interrupt,
    progress,
    stream,
    write_kernelspec,
)

from sshd import SshServer

SSHPYK_TARGET = "bench_sshpyk_target"  # kernelspec in the sessions' HOME, run by sshpyk
CTRL_TIMEOUT = 10.0  # ssh -O exit / ssh -V
MAX_SESSIONS = 64  # the bench sshds' MaxSessions; OpenSSH's default is 10


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool = False
    stat: str = "median"  # median, p90, single
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, side: str, value: float) -> None:
        self.samples.setdefault(side, []).append(value)

    def value(self, side: str) -> float | None:
        return bk.summarize(self.samples.get(side, []), self.stat)

    def ratio(self, side: str, other: str) -> float | None:
        a, b = self.value(side), self.value(other)
        if a is None or b is None or b == 0:
            return None
        return a / b


# -- environment -------------------------------------------------------------------------


def openssh_version() -> str:
    try:
        out = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, timeout=CTRL_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "not found"
    return (out.stderr or out.stdout).strip().split(",")[0]


def machine_info() -> dict[str, str]:
    info = bk.machine_info()
    try:
        info["sshpyk"] = metadata.version("sshpyk")
    except metadata.PackageNotFoundError:
        info["sshpyk"] = "not installed"
    info["openssh"] = openssh_version()
    return info


def have_sshpyk(info: dict[str, str]) -> bool:
    return info["sshpyk"] != "not installed" and shutil.which("ssh") is not None


class BenchSshServer(SshServer):
    """The tests' sshd with a higher MaxSessions.

    sshpyk runs every step (launch, ``ps`` polls, ``kill``, ``-O check``) as a session of its
    ControlMaster's connection; 10 concurrent starts exceed OpenSSH's default of 10 sessions
    per connection ("no more sessions" in the sshd log) and about one kernel in ten fails to
    start. This package's forwards are direct-tcpip channels, not sessions, so it is not
    affected either way.
    """

    def _write_config(self, authorized_keys: Path, extra: list[str]) -> None:
        super()._write_config(authorized_keys, extra)
        lines = [
            f"MaxSessions {MAX_SESSIONS}" if line.startswith("MaxSessions ") else line
            for line in self.config.read_text().splitlines()
        ]
        self.config.write_text("\n".join(lines) + "\n")


def sshpyk_ssh_options(cm_dir: Path) -> dict[str, object]:
    """The options sshpyk needs in every Host block it uses (its -L forwards live in the
    ControlMaster), plus quiet batch mode."""
    return {
        "BatchMode": "yes",
        "ConnectTimeout": 5,
        "LogLevel": "ERROR",
        "ControlMaster": "auto",
        "ControlPath": cm_dir / "%C",
        "ControlPersist": "10m",
    }


def write_sshpyk_target_spec(home: Path) -> None:
    """The kernelspec sshpyk's remote SSHKernelApp starts *by name*, in the sessions' HOME."""
    write_kernelspec(
        home / ".local" / "share" / "jupyter" / "kernels",
        SSHPYK_TARGET,
        {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "bench sshpyk target", "language": "python",
         "interrupt_mode": "signal"},
    )  # fmt: skip


def write_sshpyk_spec(kernels: Path, name: str, ssh_config: Path, alias: str) -> None:
    """A local kernelspec using sshpyk-provisioner to reach ``alias`` of ``ssh_config``."""
    config = {
        "ssh": shutil.which("ssh"),
        "ssh_config": str(ssh_config),  # passed as `ssh -F` to every ssh call
        "ssh_host_alias": alias,
        "remote_python": sys.executable,
        "remote_kernel_name": SSHPYK_TARGET,
        "launch_timeout": 20,
        "shutdown_time": 5,
    }
    write_kernelspec(
        kernels,
        name,
        {
            # Only for apps that launch argv themselves; the provisioner ignores it.
            "argv": [sys.executable, "-m", "sshpyk.kernelapp",
                     f"--SSHKernelApp.kernel_name={name}",
                     "--KernelManager.connection_file={connection_file}"],
            "display_name": f"bench {name}",
            "language": "python",
            "interrupt_mode": "message",  # sshpyk's send_signal() does nothing
            "metadata": {
                "kernel_provisioner": {"provisioner_name": "sshpyk-provisioner",
                                       "config": config},
            },
        },
    )  # fmt: skip


def ssh_processes(marker: str, descendants_of: int | None = None) -> list[tuple[int, float]]:
    """(pid, RSS MiB) of live ``ssh`` client processes whose command line holds ``marker``,
    or, with ``descendants_of``, that descend from that pid.

    A ControlMaster renames itself to ``ssh: <ControlPath> [mux]`` and leaves its parent,
    hence the match on the executable and on a marker (the temp dir) rather than on argv.
    """
    ssh = os.path.realpath(shutil.which("ssh") or "/usr/bin/ssh")
    statuses: dict[int, dict[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{entry}/status").read_text()
            statuses[int(entry)] = {
                k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
            }
    parents = {pid: int(f.get("PPid", "0")) for pid, f in statuses.items()}

    def descends(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parents.get(pid, 0)
            if pid == descendants_of:
                return True
        return False

    found = []
    for pid, fields in statuses.items():
        try:
            if os.readlink(f"/proc/{pid}/exe") != ssh:
                continue
            if descendants_of is not None:
                if not descends(pid):
                    continue
            elif marker.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        if fields.get("State", "").startswith("Z"):
            continue
        rss_kib = int(fields.get("VmRSS", "0 kB").split()[0])
        found.append((pid, rss_kib / 1024))
    return found


def stop_control_masters(ssh_config: Path, aliases: Iterable[str], marker: str) -> None:
    """``ssh -O exit`` each alias's ControlMaster, then kill any ssh process on ``marker``."""
    if not ssh_config.exists():
        return
    for alias in aliases:
        cmd = ["ssh", "-F", str(ssh_config), "-O", "exit", alias]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, capture_output=True, timeout=CTRL_TIMEOUT, check=False)
    pids = [pid for pid, _ in ssh_processes(marker)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and ssh_processes(marker):
            time.sleep(0.05)
        pids = [pid for pid, _ in ssh_processes(marker)]
        if not pids:
            break


# -- kernels -----------------------------------------------------------------------------

RETRIES: list[str] = []  # starts that failed once and were retried (reported at the end)


async def start_kernel(kernels: Kernels, spec: str, side: str) -> tuple[Any, Any, float]:
    """Start a kernel of kernelspec ``spec``; retry once (timed in full) if it died at start.

    jupyter_client picks the kernel's ports before the kernel binds them, and another process
    can take one meanwhile ("Address already in use", jupyter_client issue 487): seen here
    with a test suite running beside the bench. One retry keeps the run; it is reported.
    """
    t0 = time.perf_counter()
    try:
        return await kernels.start(spec)
    except RuntimeError as exc:
        RETRIES.append(f"{side}: {exc}")
        progress(f"{side}: start failed ({exc}); retrying once")
    km, kc, _ = await kernels.start(spec)
    return km, kc, time.perf_counter() - t0


async def streams_and_interrupts(
    p: Any, main: dict[str, tuple[Any, Any]], figures: dict[str, Figure], sides: Iterable[str],
    label: str = "",
) -> None:  # fmt: skip
    """The stream and interrupt figures of the sides' main kernels, sides interleaved."""
    prefix = f"{label} " if label else ""
    for _ in range(p.stream_runs):
        for side in sides:
            rate = await stream(main[side][1], p.stream_mib)
            figures["stream"].add(side, rate)
            progress(f"{prefix}{side}: stream {rate:.1f} MiB/s")
    for _ in range(p.interrupts):
        for side in sides:
            ms = await interrupt(*main[side]) * 1000
            figures["interrupt"].add(side, ms)
            progress(f"{prefix}{side}: interrupt {ms:.1f} ms")


async def run_bounded(
    kernels: Kernels, work: Callable[[], Coroutine[Any, Any, None]], limit: float = TOTAL_TIMEOUT
) -> None:
    """Run ``work()`` within ``limit`` seconds (SIGTERM cancels it); then shut every kernel
    still alive down, concurrently (sshpyk's shutdown polls the remote over ssh, slowly)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await asyncio.wait_for(work(), limit)
    finally:
        progress("shutting down kernels")
        live, kernels.live = kernels.live, []
        results = await asyncio.gather(
            *(_shutdown_one(km, kc) for km, kc in live), return_exceptions=True
        )
        for (km, _), result in zip(live, results):
            if isinstance(result, BaseException):
                progress(f"warning: shutting down kernel {km.kernel_id}: {result!r}")


async def _shutdown_one(km: Any, kc: Any) -> None:
    if kc is not None:
        kc.stop_channels()
    if await km.is_alive():
        await asyncio.wait_for(km.shutdown_kernel(now=True), SHUTDOWN_TIMEOUT)
    else:
        await asyncio.wait_for(km.cleanup_resources(), SHUTDOWN_TIMEOUT)


# -- output ------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "":
        return f"{value:.1f}" if value != int(value) else f"{value:.0f}"
    if unit == "MiB" and abs(value) < 10:
        return f"{value:.2f}"
    return bk.fmt(value)


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def header(info: dict[str, str], quick: bool) -> list[str]:
    return [
        f"date: {info['date']}   host: {info['host']}{'   (--quick)' if quick else ''}",
        f"machine: {info['nproc']} CPU(s), {info['cpu']}",
        (
            f"python {info['python']}, asyncssh {info['asyncssh']}, jupyter_client "
            f"{info['jupyter_client']}, ipykernel {info['ipykernel']}, pyzmq {info['pyzmq']}, "
            f"sshpyk {info['sshpyk']}, {info['openssh']}"
        ),
    ]


class TrackedKernels(Kernels):
    """``Kernels`` that records the ids of kernels of any spec in ``remote``, so that their
    kernel dirs can be removed on exit (``Kernels`` does it for ``bench_remote`` only)."""

    def __init__(self, remote: Iterable[str]) -> None:
        super().__init__()
        self.remote = set(remote)

    async def start(self, name: str) -> tuple[Any, Any, float]:
        try:
            return await super().start(name)
        finally:
            for km, _ in self.live:
                kid = km.kernel_id
                if km.kernel_name in self.remote and kid and kid not in self.remote_ids:
                    self.remote_ids.append(kid)
