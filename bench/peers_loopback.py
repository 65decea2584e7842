"""The loopback peer benchmark: a local ipykernel, this package and sshpyk on one sshd.

All three kernels run on this machine; both remote ones reach it through the same throwaway
loopback sshd (``tests/sshd.py``). This package talks SSH in-process (asyncssh, one shared
connection per target); sshpyk drives the system ``ssh`` client, with a ControlMaster holding
its ``-L`` forwards. The ratios compare the two provisioners. Run by
``bench_peers.py --loopback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_kernels as bk  # also puts tests/ on sys.path
from bench_kernels import LOCAL, REMOTE, Kernels, interrupt, progress, round_trip, stream
from peers_common import (
    RETRIES,
    BenchSshServer,
    Figure,
    fmt,
    fmt_ratio,
    have_sshpyk,
    header,
    machine_info,
    run_bounded,
    ssh_processes,
    sshpyk_ssh_options,
    start_kernel,
    stop_control_masters,
    streams_and_interrupts,
    write_sshpyk_spec,
    write_sshpyk_target_spec,
)

from sshd import current_user, ssh_config_block

SSHPYK = "bench_sshpyk"  # local kernelspec using sshpyk-provisioner
SSHPYK_ALIAS = "benchhost_sshpyk"  # Host block in the sshpyk ssh_config
SIDES = ("local", "package", "sshpyk")
SPEC = {"local": LOCAL, "package": REMOTE, "sshpyk": SSHPYK}
LABEL = {"local": "local", "package": "this package", "sshpyk": "sshpyk"}
RTT_BLOCK = bk.RTT_BLOCK
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
        write_sshpyk_target_spec(ssh / "home")
        (ssh / "cm").mkdir()
        options = {
            "HostName": self.server.host,
            "Port": self.server.port,
            "User": current_user(),
            "IdentityFile": ssh / "id_ed25519",
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": ssh / "known_hosts",
            "StrictHostKeyChecking": "yes",
            **sshpyk_ssh_options(ssh / "cm"),
        }
        self.sshpyk_config.write_text(ssh_config_block(SSHPYK_ALIAS, options))
        write_sshpyk_spec(self.root / "data" / "kernels", SSHPYK, self.sshpyk_config, SSHPYK_ALIAS)

    def close(self, remote_kernel_ids: list[str]) -> None:
        with contextlib.suppress(Exception):
            stop_control_masters(self.sshpyk_config, [SSHPYK_ALIAS], str(self.root))
        super().close(remote_kernel_ids)  # sshd, its sessions and their processes, temp dir


# -- the run -----------------------------------------------------------------------------


async def concurrent_start(
    kernels: Kernels, side: str, n: int, figures: dict[str, Figure], marker: str
) -> None:
    """Start ``n`` kernels at once; time until all are ready, then the resources they hold."""
    rss0, threads0 = self_usage()
    ssh0 = own_ssh_processes(side, marker)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(start_kernel(kernels, SPEC[side], side) for _ in range(n)), return_exceptions=True
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
        figures["concurrent"].add(side, elapsed)
        figures["rss"].add(side, (rss1 - rss0) / n)
        figures["rss_all"].add(side, (rss1 - rss0 + ssh_rss1 - ssh_rss0) / n)
        figures["threads"].add(side, (threads1 - threads0) / n)
        figures["ssh_procs"].add(side, len(ssh1))
        figures["ssh_rss"].add(side, ssh_rss1)
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
        km, kc, seconds = await start_kernel(kernels, SPEC[side], side)
        figures["cold_start"].add(side, seconds)
        main[side] = (km, kc)
        progress(f"{side}: cold start {seconds:.2f} s")

    for _ in range(p.warm_starts):  # interleaved, so drift hits all sides alike
        for side in sides:
            km, kc, seconds = await start_kernel(kernels, SPEC[side], side)
            figures["warm_start"].add(side, seconds)
            down = await kernels.shutdown(km, kc)
            figures["shutdown"].add(side, down)
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
                figures["rtt_median"].add(side, ms)
                figures["rtt_p90"].add(side, ms)
            cpu[side] += time.process_time() - cpu0
            ssh_cpu[side] += ssh_cpu_seconds(pids) - ssh0
    for side in sides:
        samples = figures["rtt_median"].samples[side]
        per_rtt = 1000 / len(samples)
        figures["rtt_cpu"].add(side, cpu[side] * per_rtt)
        figures["rtt_cpu_all"].add(side, (cpu[side] + ssh_cpu[side]) * per_rtt)
        progress(
            f"{side}: round trip median {statistics.median(samples):.2f} ms, CPU per round "
            f"trip {cpu[side] * per_rtt:.2f} ms here + {ssh_cpu[side] * per_rtt:.2f} ms in ssh"
        )
    await streams_and_interrupts(p, main, figures, sides)


async def run(
    p: Params, figures: dict[str, Figure], kernels: Kernels, sides: tuple[str, ...], marker: str
) -> None:
    await run_bounded(kernels, lambda: measure(p, figures, kernels, sides, marker))


# -- output ------------------------------------------------------------------------------


def table_rows(figures: dict[str, Figure]) -> list[tuple[str, ...]]:
    rows = [("figure", "unit", "local", "this package", "sshpyk", "package/local",
             "package/sshpyk")]  # fmt: skip
    for f in figures.values():
        rows.append(
            (f.label, f.unit, *(fmt(f.value(s), f.unit) for s in SIDES),
             fmt_ratio(f.ratio("package", "local")), fmt_ratio(f.ratio("package", "sshpyk")))
        )  # fmt: skip
    return rows


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


def main(args: Any) -> int:
    p = QUICK if args.quick else Params()
    figures = make_figures(p)
    info = machine_info()
    with_sshpyk = have_sshpyk(info)
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
