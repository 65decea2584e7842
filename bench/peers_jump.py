"""The jump peer benchmark: local, this package direct / through 1 and 2 jumps, sshpyk.

For each one-way delay between this machine and the bastion (``topology.py``), one table:
a local ipykernel (the yardstick), this package to the bastion itself (``direct``), to the
target through the bastion (``1 jump``) and through the bastion and ``jump2`` (``2 jumps``),
and sshpyk to the target with ``ProxyJump`` through the bastion. Run by ``bench_peers.py``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import asyncssh
import bench_kernels as bk
from bench_kernels import RTT_BLOCK, Kernels, interrupt, progress, round_trip, stream
from peers_common import (
    RETRIES,
    Figure,
    TrackedKernels,
    fmt,
    fmt_ratio,
    have_sshpyk,
    header,
    machine_info,
    run_bounded,
    start_kernel,
    streams_and_interrupts,
)
from topology import SIDES, JumpEnvironment, Route

from jupyter_remote_provisioner import pool

LABEL = {"local": "local", "direct": "direct", "jump1": "1 jump", "jump2": "2 jumps",
         "sshpyk": "sshpyk (1 jump)"}  # fmt: skip
ROUTE_LIMIT = 300.0  # seconds for the measurements of one delay
LINK_PINGS = 20  # refused channel opens that measure the link's round trip
CLOSED_PORT = 1  # nothing listens there on the bastion: sshd answers "open failed"
LINK_RTT: dict[str, float] = {}  # route name -> measured round trip to the bastion, seconds


@dataclass
class Params:
    cold_starts: int = 3  # each after closing every connection the sides keep
    restarts: int = 2  # starts after a shutdown before the main kernel's (which counts too)
    warm_starts: int = 3
    round_trips: int = 200
    stream_mib: int = 16
    stream_runs: int = 3
    interrupts: int = 3


QUICK = Params(
    cold_starts=1, restarts=0, warm_starts=1, round_trips=25, stream_runs=1, interrupts=1
)
TIME_LIKE = ("cold_start", "restart", "warm_start", "rtt_median", "rtt_p90", "interrupt",
             "shutdown_last", "shutdown_busy")  # fmt: skip


def make_figures(p: Params) -> dict[str, Figure]:
    figures = [
        Figure("cold_start", f"cold start to ready: no SSH connection (median of {p.cold_starts})",
               "s"),
        Figure("restart", "start after the previous kernel was shut down (median of "
               f"{p.restarts + 1})", "s"),
        Figure("warm_start", f"warm start while another kernel lives (median of {p.warm_starts})",
               "s"),
        Figure("rtt_median", f"execute round trip, median of {p.round_trips}", "ms"),
        Figure("rtt_p90", f"execute round trip, p90 of {p.round_trips}", "ms", stat="p90"),
        Figure("stream", f"stream {p.stream_mib} MiB stdout, median of {p.stream_runs} "
               "(higher is better)", "MiB/s", higher_is_better=True),
        Figure("interrupt", f"interrupt to KeyboardInterrupt (median of {p.interrupts})", "ms"),
        Figure("shutdown_last", "graceful shutdown, no other kernel of the side (median of "
               f"{p.cold_starts + p.restarts + 1})", "s"),
        Figure("shutdown_busy", f"graceful shutdown, another kernel lives (median of "
               f"{p.warm_starts})", "s"),
    ]  # fmt: skip
    return {f.key: f for f in figures}


# -- the run -----------------------------------------------------------------------------


async def start_stop(kernels: Kernels, route: Route, side: str, figures: dict[str, Figure],
                     start_key: str, stop_key: str) -> None:  # fmt: skip
    """Start a kernel of ``side`` (timed as ``start_key``), then shut it down (``stop_key``)."""
    km, kc, seconds = await start_kernel(kernels, route.specs[side], side)
    figures[start_key].add(side, seconds)
    down = await kernels.shutdown(km, kc)
    figures[stop_key].add(side, down)
    progress(f"{route.name} {side}: {start_key} {seconds:.2f} s, shutdown {down:.2f} s")


async def link_rtt(env: JumpEnvironment, route: Route) -> float:
    """The round trip to the bastion as SSH sees it (median of refused channel opens):
    the relay's delay both ways plus what the relay and the hops add, with no kernel."""
    samples = []
    config = [str(env.ssh / "ssh_config")]
    async with asyncssh.connect(route.bastion, config=config) as conn:
        for _ in range(LINK_PINGS):
            t0 = time.perf_counter()
            try:
                await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", CLOSED_PORT)
            except asyncssh.ChannelOpenError:
                samples.append(time.perf_counter() - t0)
            else:
                raise RuntimeError(f"port {CLOSED_PORT} is open on the bastion")
    return statistics.median(samples)


async def forget_connections(env: JumpEnvironment, route: Route, sides: tuple[str, ...]) -> None:
    """Close what the sides keep after their last kernel (this package's connections, after
    connection_persist; sshpyk's ControlMasters), so that the next start is cold."""
    await asyncio.to_thread(pool.close_kept_connections, 10.0)
    if "sshpyk" in sides:
        await asyncio.to_thread(env.stop_sshpyk, route)


async def measure(
    p: Params,
    env: JumpEnvironment,
    route: Route,
    figures: dict[str, Figure],
    kernels: Kernels,
    sides: tuple[str, ...],
) -> None:
    # Sides interleaved throughout, so drift hits them alike. No kernel of a side lives
    # until its main kernel starts: the starts before it are cold or follow a shutdown.
    for _ in range(p.cold_starts):
        await forget_connections(env, route, sides)
        for side in sides:
            await start_stop(kernels, route, side, figures, "cold_start", "shutdown_last")
    for _ in range(p.restarts):
        for side in sides:
            await start_stop(kernels, route, side, figures, "restart", "shutdown_last")
    main = {}
    for side in sides:  # the long-lived kernels: also started after a shutdown
        km, kc, seconds = await start_kernel(kernels, route.specs[side], side)
        figures["restart"].add(side, seconds)
        main[side] = (km, kc)
        progress(f"{route.name} {side}: main kernel started in {seconds:.2f} s")
    for _ in range(p.warm_starts):
        for side in sides:
            await start_stop(kernels, route, side, figures, "warm_start", "shutdown_busy")

    for side in sides:  # warm-up, not counted
        km, kc = main[side]
        for _ in range(5):
            await round_trip(kc)
        await stream(kc, 4)
        await interrupt(km, kc)  # the first KeyboardInterrupt of a kernel is slower
    # Round trips in alternating blocks: per-sample alternation would let one kernel's
    # after-reply work steal CPU from the other's sample.
    for start in range(0, p.round_trips, RTT_BLOCK):
        for side in sides:
            for _ in range(min(RTT_BLOCK, p.round_trips - start)):
                ms = await round_trip(main[side][1]) * 1000
                figures["rtt_median"].add(side, ms)
                figures["rtt_p90"].add(side, ms)
    for side in sides:
        samples = figures["rtt_median"].samples[side]
        progress(f"{route.name} {side}: round trip median {statistics.median(samples):.1f} ms")
    await streams_and_interrupts(p, main, figures, sides, route.name)
    for side in sides:
        down = await kernels.shutdown(*main[side])
        figures["shutdown_last"].add(side, down)
        progress(f"{route.name} {side}: main kernel shut down in {down:.2f} s")


async def run(
    p: Params,
    env: JumpEnvironment,
    figures: dict[str, dict[str, Figure]],
    kernels: Kernels,
    sides: tuple[str, ...],
) -> None:
    # Import both provisioners now: the first cold start would otherwise include it.
    import jupyter_remote_provisioner.provisioner  # noqa: F401

    if "sshpyk" in sides:
        import sshpyk.provisioning  # noqa: F401
    for route in env.routes:
        progress(f"one-way delay {route.name} to the bastion ({route.bastion})")
        LINK_RTT[route.name] = await link_rtt(env, route)
        progress(f"round trip to the bastion: {LINK_RTT[route.name] * 1000:.1f} ms")
        work = functools.partial(measure, p, env, route, figures[route.name], kernels, sides)
        await run_bounded(kernels, work, ROUTE_LIMIT)
        if "sshpyk" in sides:  # its ControlMasters would idle on through the next delay
            await asyncio.to_thread(env.stop_sshpyk, route)


# -- output ------------------------------------------------------------------------------


def seconds(f: Figure, side: str) -> float | None:
    value = f.value(side)
    if value is None:
        return None
    return value / 1000 if f.unit == "ms" else value


def rtt_multiple(f: Figure, side: str, rtt: float) -> float | None:
    """N such that ``side``'s figure = local's + N x RTT (time-like figures only)."""
    a, b = seconds(f, side), seconds(f, "local")
    if f.key not in TIME_LIKE or a is None or b is None or rtt <= 0:
        return None
    return (a - b) / rtt


def table_rows(route: Route, figures: dict[str, Figure]) -> list[tuple[str, ...]]:
    rtt = LINK_RTT.get(route.name, 0.0) if route.delay_ms else 0.0
    head = ("figure", "unit", *(LABEL[s] for s in SIDES), "1 jump / direct", "1 jump / sshpyk")
    rows = [head + (("1 jump = local + N x RTT",) if rtt else ())]
    for f in figures.values():
        ratios = (fmt_ratio(f.ratio("jump1", "direct")), fmt_ratio(f.ratio("jump1", "sshpyk")))
        row = (f.label, f.unit, *(fmt(f.value(s), f.unit) for s in SIDES), *ratios)
        if rtt:
            n = rtt_multiple(f, "jump1", rtt)
            row += ("" if n is None else f"local + {n:.1f} x RTT",)
        rows.append(row)
    return rows


def round_trip_verdicts(route: Route, figures: dict[str, Figure]) -> list[str]:
    """The execute round trip against its yardstick: the same kernel reached directly (no
    added delay), or the local kernel's round trip plus the link's (added delay)."""
    f, lines = figures["rtt_median"], []
    local, direct = f.value("local"), f.value("direct")
    rtt_ms = LINK_RTT.get(route.name, 0.0) * 1000
    for side in ("jump1", "jump2"):
        value = f.value(side)
        if value is None:
            continue
        if not route.delay_ms and direct:
            lines.append(f"execute round trip, {LABEL[side]} / direct: {value / direct:.2f}")
        elif route.delay_ms and local is not None:
            yardstick = local + rtt_ms
            lines.append(
                f"execute round trip, {LABEL[side]} / (local {local:.1f} ms + link "
                f"{rtt_ms:.1f} ms): {value / yardstick:.2f}"
            )
    return lines


def start_round_trips(routes: list[Route], figures: dict[str, dict[str, Figure]]) -> list[str]:
    """Round trips in each kind of start: (time at delay D - time at 0 ms) / link RTT at D."""
    base = next((r for r in routes if not r.delay_ms), None)
    if base is None:
        return []
    lines = []
    for route in routes:
        rtt = LINK_RTT.get(route.name, 0.0) - LINK_RTT.get(base.name, 0.0)
        if not route.delay_ms or rtt <= 0:
            continue
        for key, what in (("cold_start", "cold start"), ("restart", "start after a shutdown"),
                          ("warm_start", "warm start")):  # fmt: skip
            counts = []
            for side in SIDES[1:]:
                slow, fast = (seconds(figures[r.name][key], side) for r in (route, base))
                if slow is not None and fast is not None:
                    counts.append(f"{LABEL[side]} {(slow - fast) / rtt:.1f}")
            lines.append(f"{what}, round trips ({route.name} vs 0 ms): {', '.join(counts)}")
    return lines


def print_tables(
    info: dict[str, str], routes: list[Route], figures: dict[str, dict[str, Figure]], quick: bool
) -> None:
    print("\n".join(header(info, quick)))
    for route in routes:
        link = LINK_RTT.get(route.name)
        measured = f"; measured round trip {link * 1000:.1f} ms" if link else ""
        print(f"\none-way delay {route.delay_ms:g} ms this machine <-> bastion (ssh alias "
              f"{route.bastion}{measured})")  # fmt: skip
        rows = table_rows(route, figures[route.name])
        bk.print_rows(rows, numeric=range(2, len(rows[0])))
        for line in round_trip_verdicts(route, figures[route.name]):
            print(line)
    for line in start_round_trips(routes, figures):
        print(line)


def results_json(
    info: dict[str, str],
    routes: list[Route],
    figures: dict[str, dict[str, Figure]],
    p: Params,
    quick: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": info, "quick": quick, "params": p.__dict__,
                           "retried_starts": RETRIES, "delays": {}}  # fmt: skip
    for route in routes:
        rtt = LINK_RTT.get(route.name, 0.0) if route.delay_ms else 0.0
        out["delays"][route.name] = {
            "one_way_delay_ms": route.delay_ms,
            "link_rtt_s": LINK_RTT.get(route.name),
            "bastion_alias": route.bastion,
            "kernelspecs": route.specs,
            "figures": {
                f.key: {
                    "label": f.label,
                    "unit": f.unit,
                    "higher_is_better": f.higher_is_better,
                    **{s: f.value(s) for s in SIDES},
                    "jump1/direct": f.ratio("jump1", "direct"),
                    "jump1/sshpyk": f.ratio("jump1", "sshpyk"),
                    "rtt_multiples": {s: rtt_multiple(f, s, rtt) for s in SIDES[1:]}
                    if rtt
                    else None,
                    "samples": f.samples,
                }
                for f in figures[route.name].values()
            },
        }
    return out


def main(args: Any) -> int:
    if os.geteuid() != 0:
        print("the jump topology needs root (network namespaces); --loopback does not",
              file=sys.stderr)  # fmt: skip
        return 2
    p = QUICK if args.quick else Params()
    info = machine_info()
    with_sshpyk = have_sshpyk(info)
    sides = SIDES if with_sshpyk else SIDES[:-1]
    if not with_sshpyk:
        progress("sshpyk or the ssh client is not installed: its column stays n/a")
    env = JumpEnvironment(args.delays, with_sshpyk)
    figures = {f"{d:g}ms": make_figures(p) for d in args.delays}
    kernels = TrackedKernels(())

    async def work() -> None:
        kernels.remote.update(env.remote_specs())
        await run(p, env, figures, kernels, sides)

    def report() -> None:
        print_tables(info, env.routes, figures, args.quick)
        for retry in RETRIES:
            print(f"retried a start that failed: {retry}")

    return bk.measure_and_report(
        args, env, kernels, work, report,
        lambda: results_json(info, env.routes, figures, p, args.quick),
    )  # fmt: skip
