"""``check NAME``: connect the way the kernel would and report each step, then a verdict.

Steps: every hop's host key and login (jump hosts first), the remote interpreter, ipykernel,
the round trip to the remote agent, and who else on the host could read the kernel's
traffic. Nothing is left running afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from .agent import AgentError, AgentLost, RemoteAgent
from .encryption import declares_curve, traffic
from .errors import RemoteKernelError
from .kernel_settings import KernelSettings
from .kernelspec import find_spec
from .provisioner import settings_from_config
from .sessions import connected_agent
from .sites.slurm_jobs import test_only
from .sites.slurm_request import SlurmRequest
from .ssh import Connection

PINGS = 5
OK, FAIL, SKIP, WARN = "[ok]", "[FAIL]", "[--]", "[warn]"

Report = Callable[[str], None]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="connect like the kernel would and report each step",
        description="Connect to a remote kernelspec's host the way the kernel would and report, "
        "step by step: each jump host and the host (host key, login), the remote python and "
        "ipykernel versions, and the round-trip time. Exits non-zero on failure.",
    )
    parser.add_argument("name", help="the kernelspec's slug or display name")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    spec = find_spec(args.name)
    settings = settings_from_config(spec.config)
    print(f"Checking {spec.slug} ({spec.display_name}): {settings.target.describe(users=True)}")
    declared = declares_curve(spec.spec.get("metadata"))
    ok = asyncio.run(check(settings, lambda line: print(line, flush=True), declared))
    if ok:
        print(f"OK: {spec.slug} is ready to use.")
        return 0
    print(f"FAILED: {spec.slug} cannot start a kernel; fix the step marked {FAIL} above.")
    return 1


async def check(settings: KernelSettings, report: Report, declared: bool = False) -> bool:
    """Run every step, reporting each; True when a kernel could start. ``declared``: the
    kernelspec declares CurveZMQ support."""
    target = settings.target

    def hop_done(index: int, seconds: float) -> None:
        hop = target.hops[index]
        role = "host" if index == len(target.hops) - 1 else "jump host"
        report(f"  {OK:<6} {role} {hop.label}: host key verified, logged in as {hop.user} "
               f"({seconds * 1000:.0f} ms)")  # fmt: skip

    try:
        async with connected_agent(settings, hop_done) as (conn, agent):
            ok = _report_remote(agent, settings, report) and await _report_round_trip(agent, report)
            if ok and settings.slurm is not None:
                ok = await _report_slurm(conn, settings.slurm, report)
            if ok:
                _report_traffic(agent, settings, declared, report)
            return ok
    except RemoteKernelError as exc:
        report(f"  {FAIL:<6} {exc}")
        return False


def _report_remote(agent: RemoteAgent, settings: KernelSettings, report: Report) -> bool:
    hello = agent.hello
    report(f"  {OK:<6} remote python: {hello.get('executable')} (Python {hello.get('python')})")
    if settings.kernel_argv:
        report(f"  {SKIP:<6} ipykernel: not needed (kernel_argv: {' '.join(settings.kernel_argv)})")
        return True
    version = hello.get("ipykernel")
    if not version:
        report(f"  {FAIL:<6} ipykernel is not installed for {settings.python}; install it there with "
               f"`{settings.python} -m pip install ipykernel`")  # fmt: skip
        return False
    report(f"  {OK:<6} ipykernel {version}")
    return True


async def _report_round_trip(agent: RemoteAgent, report: Report) -> bool:
    samples = []
    for _ in range(PINGS):
        started = time.perf_counter()
        try:
            await agent.request("ping", reply_timeout=10)
        except (AgentError, AgentLost, asyncio.TimeoutError) as exc:
            report(f"  {FAIL:<6} round trip: no answer from the remote agent ({exc or 'timeout'})")
            return False
        samples.append(time.perf_counter() - started)
    report(f"  {OK:<6} round trip: {statistics.median(samples) * 1000:.1f} ms (median of {PINGS})")
    return True


async def _report_slurm(conn: Connection, request: SlurmRequest, report: Report) -> bool:
    """Ask the cluster whether it would run the kernel's job (sbatch --test-only)."""
    try:
        verdict = await test_only(conn, request.sbatch_args())
    except RemoteKernelError as exc:
        report(f"  {FAIL:<6} {exc}")
        return False
    report(f"  {OK:<6} Slurm accepts the request ({request.sbatch_line()}): {verdict}")
    return True


def _report_traffic(
    agent: RemoteAgent, settings: KernelSettings, declared: bool, report: Report
) -> None:
    """Whether other users of the host could read the kernel's traffic (a warning, not a
    failure: the kernel runs)."""
    exposed, line = traffic(
        settings.target.host.label, settings.transport, declared, bool(settings.kernel_argv),
        None if settings.kernel_argv else str(agent.hello.get("ipykernel") or ""),
        node=settings.slurm is not None,
    )  # fmt: skip
    report(f"  {WARN if exposed else OK:<6} {line.removeprefix('warning: ')}")
