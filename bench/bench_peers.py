"""Benchmark a local ipykernel, remote-ssh-provisioner and sshpyk, in one run, on one sshd.

All three kernels run on this machine; both remote ones reach it through the same throwaway
loopback sshd that the script starts (``tests/sshd.py``). This package talks SSH in-process
(asyncssh, one shared connection per target); sshpyk drives the system ``ssh`` client, with
a ControlMaster holding its ``-L`` forwards. The ratios compare the two provisioners.

    python3 bench/bench_peers.py [--quick] [--json PATH]

Only numbers are printed, nothing is asserted. Every wait is bounded, and everything the
script starts (sshd, kernels, the ControlMaster, temp dirs) is removed on exit, Ctrl-C or
error. The kernel helpers (start, round trip, stream, interrupt, shutdown) and the sshd set
up come from ``bench_kernels.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bk  # also puts tests/ on sys.path
from bench_kernels import (
    LOCAL,
    REMOTE,
    SHUTDOWN_TIMEOUT,
    TOTAL_TIMEOUT,
    Kernels,
    interrupt,
    progress,
    round_trip,
    stream,
    write_kernelspec,
)

from sshd import SshServer, current_user, ssh_config_block

SSHPYK = "bench_sshpyk"  # local kernelspec using sshpyk-provisioner
SSHPYK_ALIAS = "benchhost_sshpyk"  # Host block in the sshpyk ssh_config
SSHPYK_TARGET = "bench_sshpyk_target"  # kernelspec in the sessions' HOME, run by sshpyk
SIDES = ("local", "package", "sshpyk")
SPEC = {"local": LOCAL, "package": REMOTE, "sshpyk": SSHPYK}
LABEL = {"local": "local", "package": "this package", "sshpyk": "sshpyk"}
RTT_BLOCK = bk.RTT_BLOCK
CTRL_TIMEOUT = 10.0  # ssh -O exit / ssh -V
_LIBC = ctypes.CDLL(None)


@dataclass
class Params:
    warm_starts: int = 5
    round_trips: int = 200
    stream_mib: int = 64
    stream_runs: int = 3
    interrupts: int = 5
    concurrent: int = 10


QUICK = Params(warm_starts=1, round_trips=30, stream_mib=8, stream_runs=1, interrupts=1,
               concurrent=4)  # fmt: skip


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool = False
    stat: str = "median"  # median, p90, single
    samples: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})

    def value(self, side: str) -> float | None:
        return bk.summarize(self.samples[side], self.stat)

    def ratio(self, side: str, other: str) -> float | None:
        a, b = self.value(side), self.value(other)
        if a is None or b is None or b == 0:
            return None
        return a / b


def make_figures(p: Params) -> dict[str, Figure]:
    n = p.concurrent
    figures = [
        Figure("cold_start", "cold start to ready (1st kernel, no connection yet)", "s",
               stat="single"),
        Figure("warm_start", f"warm start to ready (median of {p.warm_starts})", "s"),
        Figure("concurrent", f"{n} kernels started concurrently, until all ready", "s",
               stat="single"),
        Figure("rtt_median", f"execute round trip, median of {p.round_trips}", "ms"),
        Figure("rtt_p90", f"execute round trip, p90 of {p.round_trips}", "ms", stat="p90"),
        Figure("rtt_cpu", "CPU time of this process per round trip", "ms", stat="single"),
        Figure("rtt_cpu_all", "CPU time per round trip, incl. ssh processes", "ms",
               stat="single"),
        Figure("stream", f"stream {p.stream_mib} MiB stdout, median of {p.stream_runs} "
               "(higher is better)", "MiB/s", higher_is_better=True),
        Figure("interrupt", f"interrupt to KeyboardInterrupt (median of {p.interrupts})", "ms"),
        Figure("shutdown", f"graceful shutdown (median of {p.warm_starts})", "s"),
        Figure("rss", f"RSS per extra kernel, in-process (of {n})", "MiB", stat="single"),
        Figure("rss_all", f"RSS per extra kernel, incl. ssh processes (of {n})", "MiB",
               stat="single"),
        Figure("threads", f"threads per extra kernel (of {n})", "", stat="single"),
        Figure("ssh_procs", f"ssh client processes while {n + 1} kernels live", "",
               stat="single"),
        Figure("ssh_rss", f"RSS of those ssh processes, total ({n + 1} kernels)", "MiB",
               stat="single"),
    ]  # fmt: skip
    return {f.key: f for f in figures}


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


def own_ssh_processes(side: str, marker: str) -> list[tuple[int, float]]:
    """The ssh client processes a side owns: sshpyk's (ControlMaster included) or children."""
    if side == "sshpyk":
        return ssh_processes(marker)
    return ssh_processes(marker, descendants_of=os.getpid())


def ssh_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by ``pids`` (single-threaded ssh: /proc/PID/schedstat, in ns)."""
    ns = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            ns += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return ns / 1e9


def self_usage() -> tuple[float, int]:
    """This process's RSS (MiB) and thread count, after a GC and returning free heap."""
    gc.collect()
    _LIBC.malloc_trim(0)  # so that freed memory reused later does not hide growth
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


MAX_SESSIONS = 64  # the bench sshd's MaxSessions; OpenSSH's default is 10


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


class PeerEnvironment(bk.Environment):
    """bench_kernels' environment plus an ssh_config and kernelspecs for sshpyk."""

    def __init__(self, with_sshpyk: bool) -> None:
        super().__init__()
        self.with_sshpyk = with_sshpyk
        self.sshpyk_config = self.root / "ssh" / "ssh_config_sshpyk"

    def setup(self) -> None:
        # sshd, keys, known_hosts, specs bench_local and bench_remote; with our sshd class
        # (sshd_config keeps the first value of a keyword, so appending would not do).
        saved, bk.SshServer = bk.SshServer, BenchSshServer
        try:
            super().setup()
        finally:
            bk.SshServer = saved
        if not self.with_sshpyk:
            return
        assert self.server is not None
        ssh = self.root / "ssh"
        # sshpyk's remote SSHKernelApp starts a kernelspec *by name* on the remote, which is
        # this machine seen through an sshd session: its HOME is bench_kernels' private one.
        home_kernels = ssh / "home" / ".local" / "share" / "jupyter" / "kernels"
        write_kernelspec(
            home_kernels,
            SSHPYK_TARGET,
            {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
             "display_name": "bench sshpyk target", "language": "python",
             "interrupt_mode": "signal"},
        )  # fmt: skip
        (ssh / "cm").mkdir()
        options = {
            "HostName": self.server.host,
            "Port": self.server.port,
            "User": current_user(),
            "IdentityFile": ssh / "id_ed25519",
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": ssh / "known_hosts",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": 5,
            "LogLevel": "ERROR",
            # sshpyk refuses to start without these (its -L forwards live in the master).
            "ControlMaster": "auto",
            "ControlPath": ssh / "cm" / "%C",
            "ControlPersist": "10m",
        }
        self.sshpyk_config.write_text(ssh_config_block(SSHPYK_ALIAS, options))
        config = {
            "ssh": shutil.which("ssh"),
            "ssh_config": str(self.sshpyk_config),  # passed as `ssh -F` to every ssh call
            "ssh_host_alias": SSHPYK_ALIAS,
            "remote_python": sys.executable,
            "remote_kernel_name": SSHPYK_TARGET,
            "launch_timeout": 20,
            "shutdown_time": 5,
        }
        write_kernelspec(
            self.root / "data" / "kernels",
            SSHPYK,
            {
                # Only for apps that launch argv themselves; the provisioner ignores it.
                "argv": [sys.executable, "-m", "sshpyk.kernelapp",
                         f"--SSHKernelApp.kernel_name={SSHPYK}",
                         "--KernelManager.connection_file={connection_file}"],
                "display_name": "bench sshpyk",
                "language": "python",
                "interrupt_mode": "message",  # sshpyk's send_signal() does nothing
                "metadata": {
                    "kernel_provisioner": {"provisioner_name": "sshpyk-provisioner",
                                           "config": config},
                },
            },
        )  # fmt: skip

    def stop_control_master(self) -> None:
        """``ssh -O exit`` the ControlMaster, then kill any ssh process left on our config."""
        if not self.sshpyk_config.exists():
            return
        cmd = ["ssh", "-F", str(self.sshpyk_config), "-O", "exit", SSHPYK_ALIAS]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, capture_output=True, timeout=CTRL_TIMEOUT, check=False)
        pids = [pid for pid, _ in ssh_processes(str(self.root))]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and ssh_processes(str(self.root)):
                time.sleep(0.05)
            pids = [pid for pid, _ in ssh_processes(str(self.root))]
            if not pids:
                break

    def close(self, remote_kernel_ids: list[str]) -> None:
        with contextlib.suppress(Exception):
            self.stop_control_master()
        super().close(remote_kernel_ids)  # sshd, its sessions and their processes, temp dir


# -- the run -----------------------------------------------------------------------------

RETRIES: list[str] = []  # starts that failed once and were retried (reported at the end)


async def start_kernel(kernels: Kernels, side: str) -> tuple[Any, Any, float]:
    """Start a kernel of ``side``; retry once (timed in full) if the kernel died at start.

    jupyter_client picks the kernel's ports before the kernel binds them, and another process
    can take one meanwhile ("Address already in use", jupyter_client issue 487): seen here
    with a test suite running beside the bench. One retry keeps the run; it is reported.
    """
    t0 = time.perf_counter()
    try:
        return await kernels.start(SPEC[side])
    except RuntimeError as exc:
        RETRIES.append(f"{side}: {exc}")
        progress(f"{side}: start failed ({exc}); retrying once")
    km, kc, _ = await kernels.start(SPEC[side])
    return km, kc, time.perf_counter() - t0


async def concurrent_start(
    kernels: Kernels, side: str, n: int, figures: dict[str, Figure], marker: str
) -> None:
    """Start ``n`` kernels at once; time until all are ready, then the resources they hold."""
    rss0, threads0 = self_usage()
    ssh0 = own_ssh_processes(side, marker)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(start_kernel(kernels, side) for _ in range(n)), return_exceptions=True
    )
    elapsed = time.perf_counter() - t0
    started = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    try:
        for error in errors:
            progress(f"{side}: a concurrent start failed: {error!r}")
        if errors:
            raise RuntimeError(f"{side}: {len(errors)} of {n} concurrent starts failed") from (
                errors[0]
            )
        rss1, threads1 = self_usage()
        ssh1 = own_ssh_processes(side, marker)
        ssh_rss0, ssh_rss1 = sum(r for _, r in ssh0), sum(r for _, r in ssh1)
        figures["concurrent"].samples[side].append(elapsed)
        figures["rss"].samples[side].append((rss1 - rss0) / n)
        figures["rss_all"].samples[side].append((rss1 - rss0 + ssh_rss1 - ssh_rss0) / n)
        figures["threads"].samples[side].append((threads1 - threads0) / n)
        figures["ssh_procs"].samples[side].append(len(ssh1))
        figures["ssh_rss"].samples[side].append(ssh_rss1)
        progress(
            f"{side}: {n} concurrent starts {elapsed:.2f} s; per kernel "
            f"{(rss1 - rss0) / n:.2f} MiB, {(threads1 - threads0) / n:.1f} threads; "
            f"{len(ssh1)} ssh processes, {ssh_rss1:.1f} MiB"
        )
    finally:
        t0 = time.perf_counter()
        downs = await asyncio.gather(
            *(kernels.shutdown(km, kc) for km, kc, _ in started), return_exceptions=True
        )
        failed = [d for d in downs if isinstance(d, BaseException)]
        progress(
            f"{side}: {len(started)} concurrent shutdowns {time.perf_counter() - t0:.2f} s"
            + (f" ({len(failed)} failed: {failed[0]!r})" if failed else "")
        )


async def measure(
    p: Params, figures: dict[str, Figure], kernels: Kernels, sides: tuple[str, ...], marker: str
) -> None:
    main = {}
    for side in sides:
        km, kc, seconds = await start_kernel(kernels, side)
        figures["cold_start"].samples[side].append(seconds)
        main[side] = (km, kc)
        progress(f"{side}: cold start {seconds:.2f} s")

    for _ in range(p.warm_starts):  # interleaved, so drift hits all sides alike
        for side in sides:
            km, kc, seconds = await start_kernel(kernels, side)
            figures["warm_start"].samples[side].append(seconds)
            down = await kernels.shutdown(km, kc)
            figures["shutdown"].samples[side].append(down)
            progress(f"{side}: warm start {seconds:.2f} s, shutdown {down:.2f} s")

    # Before the streams (their big buffers would be reused by the kernels measured here).
    # This package first: what earlier sides free (and malloc_trim cannot return) helps the
    # sides measured after it, so the order is the one least flattering to this package.
    for side in sorted(sides, key=("package", "sshpyk", "local").index):
        await concurrent_start(kernels, side, p.concurrent, figures, marker)

    for side in sides:  # warm-up, not counted
        km, kc = main[side]
        for _ in range(10):
            await round_trip(kc)
        await stream(kc, min(8, p.stream_mib))
        await interrupt(km, kc)  # the first KeyboardInterrupt of a kernel is slower
    # Round trips in alternating blocks: per-sample alternation would let one kernel's
    # after-reply work steal CPU from the other's sample. CPU time of this process (all its
    # threads, so this package's SSH thread too) and of the side's ssh processes is summed
    # over the blocks, to show where each provisioner spends its work.
    cpu = {s: 0.0 for s in sides}
    ssh_cpu = {s: 0.0 for s in sides}
    for start in range(0, p.round_trips, RTT_BLOCK):
        for side in sides:
            pids = [pid for pid, _ in own_ssh_processes(side, marker)]
            cpu0, ssh0 = time.process_time(), ssh_cpu_seconds(pids)
            for _ in range(min(RTT_BLOCK, p.round_trips - start)):
                ms = await round_trip(main[side][1]) * 1000
                figures["rtt_median"].samples[side].append(ms)
                figures["rtt_p90"].samples[side].append(ms)
            cpu[side] += time.process_time() - cpu0
            ssh_cpu[side] += ssh_cpu_seconds(pids) - ssh0
    for side in sides:
        samples = figures["rtt_median"].samples[side]
        per_rtt = 1000 / len(samples)
        figures["rtt_cpu"].samples[side].append(cpu[side] * per_rtt)
        figures["rtt_cpu_all"].samples[side].append((cpu[side] + ssh_cpu[side]) * per_rtt)
        progress(
            f"{side}: round trip median {statistics.median(samples):.2f} ms, CPU per round "
            f"trip {cpu[side] * per_rtt:.2f} ms here + {ssh_cpu[side] * per_rtt:.2f} ms in ssh"
        )
    for _ in range(p.stream_runs):
        for side in sides:
            rate = await stream(main[side][1], p.stream_mib)
            figures["stream"].samples[side].append(rate)
            progress(f"{side}: stream {rate:.1f} MiB/s")
    for _ in range(p.interrupts):
        for side in sides:
            ms = await interrupt(*main[side]) * 1000
            figures["interrupt"].samples[side].append(ms)
            progress(f"{side}: interrupt {ms:.1f} ms")


async def run(
    p: Params, figures: dict[str, Figure], kernels: Kernels, sides: tuple[str, ...], marker: str
) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await asyncio.wait_for(measure(p, figures, kernels, sides, marker), TOTAL_TIMEOUT)
    finally:
        progress("shutting down kernels")
        # Concurrently: sshpyk's shutdown polls the remote over ssh and takes a while each.
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


def table_rows(figures: dict[str, Figure]) -> list[tuple[str, ...]]:
    rows = [("figure", "unit", "local", "this package", "sshpyk", "package/local",
             "package/sshpyk")]  # fmt: skip
    for f in figures.values():
        rows.append(
            (f.label, f.unit, *(fmt(f.value(s), f.unit) for s in SIDES),
             fmt_ratio(f.ratio("package", "local")), fmt_ratio(f.ratio("package", "sshpyk")))
        )  # fmt: skip
    return rows


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


def print_table(info: dict[str, str], figures: dict[str, Figure], quick: bool) -> None:
    print("\n".join(header(info, quick)))
    rows = table_rows(figures)
    bk.print_rows(rows, numeric=range(2, len(rows[0])))


def results_json(info: dict[str, str], figures: dict[str, Figure], p: Params, quick: bool) -> dict:
    return {
        "machine": info,
        "quick": quick,
        "params": p.__dict__,
        "retried_starts": RETRIES,
        "figures": {
            f.key: {
                "label": f.label,
                "unit": f.unit,
                "higher_is_better": f.higher_is_better,
                **{s: f.value(s) for s in SIDES},
                "package/local": f.ratio("package", "local"),
                "package/sshpyk": f.ratio("package", "sshpyk"),
                "samples": f.samples,
            }
            for f in figures.values()
        },
    }


def main() -> int:
    args = bk.parse_args()
    p = QUICK if args.quick else Params()
    figures = make_figures(p)
    info = machine_info()
    with_sshpyk = info["sshpyk"] != "not installed" and shutil.which("ssh") is not None
    sides = SIDES if with_sshpyk else SIDES[:2]
    if not with_sshpyk:
        progress("sshpyk or the ssh client is not installed: its column stays n/a")
    env = PeerEnvironment(with_sshpyk)
    kernels = Kernels()

    def report() -> None:
        print_table(info, figures, args.quick)
        for retry in RETRIES:
            print(f"retried a start that failed: {retry}")

    return bk.measure_and_report(
        args,
        env,
        kernels,
        lambda: run(p, figures, kernels, sides, str(env.root)),
        report,
        lambda: results_json(info, figures, p, args.quick),
    )


if __name__ == "__main__":
    sys.exit(main())
