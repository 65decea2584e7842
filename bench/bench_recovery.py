"""Recovery figures: how fast a remote kernel is usable again after the SSH link comes back,
how fast what it printed meanwhile arrives and what keeping it costs the remote side, and
how fast the remote side reaps a kernel whose local side was killed.

    python3 bench/bench_recovery.py [--runs N] [--outage SECONDS] [--json PATH]

The target is a throwaway loopback sshd (as in bench_kernels.py). The outage is sshd going
down with every session (the client's connection drops at once) and coming back after
``--outage`` seconds; the figure runs from sshd listening again to the first execute that
returns the kernel's state. A local kernel's cold start, measured in the same run, is the
yardstick: reconnecting keeps the state that a fresh start would lose. Only numbers are
printed; every wait is bounded and everything started is removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import LOCAL, REMOTE, Environment, machine_info
from jupyter_client.manager import AsyncKernelManager

from jupyter_remote_provisioner.demohost import pid_alive

from kernels import wait_for_async  # tests/, on the path through bench_kernels

KEEPALIVE = 1.0  # keepalive_interval of the bench spec
ORPHAN_TIMEOUT = 2.0  # orphan_timeout of the bench spec
STEP_TIMEOUT = 60.0

SERVER = """
import sys
from jupyter_client import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
print(km.provisioner._kernel.pid, flush=True)
sys.stdin.read()
"""


async def local_cold_start() -> float:
    km = AsyncKernelManager(kernel_name=LOCAL)
    started = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=STEP_TIMEOUT)
        return time.perf_counter() - started
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


@contextlib.asynccontextmanager
async def remote_kernel() -> AsyncIterator[tuple[AsyncKernelManager, Any]]:
    """A remote kernel of the bench's spec and a ready client; both ended afterwards."""
    km = AsyncKernelManager(kernel_name=REMOTE)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=STEP_TIMEOUT)
        yield km, kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def reconnect_once(env: Environment, outage: float) -> float:
    """Seconds from sshd listening again to the first execute that sees the old state."""
    server = env.server
    assert server is not None
    async with remote_kernel() as (km, kc):
        await kc.execute_interactive("x = 42", timeout=STEP_TIMEOUT)
        kernel = km.provisioner._kernel
        server.stop()
        server.kill_all_sessions()
        await wait_for_async(lambda: kernel._recovery is not None, STEP_TIMEOUT, "the loss")
        await asyncio.sleep(outage)  # the outage itself, not a synchronisation
        server.start()
        restored = time.perf_counter()
        await wait_for_async(lambda: kernel._recovery is None, STEP_TIMEOUT, "the reconnect")
        await kc.wait_for_ready(timeout=STEP_TIMEOUT)
        out: list[str] = []
        await kc.execute_interactive(
            "print(x)",
            timeout=STEP_TIMEOUT,
            output_hook=lambda m: out.append(m["content"].get("text", "")),
        )
        elapsed = time.perf_counter() - restored
        if "".join(out).strip() != "42":
            raise RuntimeError(f"state lost across the reconnect: {out}")
        return elapsed


MISSED = """
import os, time
while not os.path.exists({marker!r}):
    time.sleep(0.01)
for i in range({lines}):
    print(f"{{i:08d}} " + "x" * 1000, flush=True)
print("done", flush=True)
open({marker!r} + ".printed", "w").close()
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def missed_once(env: Environment, mib: int, away: bool = True) -> tuple[float, float, float]:
    """While sshd is down a cell prints ``mib`` MiB (1 KiB lines): (seconds from sshd
    listening again to the last missed message delivered, MiB the keeper held, KiB of the
    daemon's memory per MiB held). ``away`` False: the same output with the client there,
    (seconds from the start of printing to the last message delivered, 0, 0)."""
    from jupyter_remote_provisioner import loop

    server = env.server
    assert server is not None
    marker = env.root / "print-now"
    marker.unlink(missing_ok=True)
    Path(f"{marker}.printed").unlink(missing_ok=True)
    async with remote_kernel() as (km, kc):
        kernel = km.provisioner._kernel
        cell = kc.execute(MISSED.format(marker=str(marker), lines=mib * 1024))
        daemon = kernel._daemon_pid
        before = rss_kib(daemon)
        if not away:
            started = time.perf_counter()
            marker.touch()
            await until_done(kc, cell)
            return time.perf_counter() - started, 0.0, 0.0
        server.stop()
        server.kill_all_sessions()
        await wait_for_async(lambda: kernel._recovery is not None, STEP_TIMEOUT, "the loss")
        marker.touch()
        await wait_for_async(Path(f"{marker}.printed").exists, STEP_TIMEOUT, "the output")
        held_kib = rss_kib(daemon) - before
        server.start()
        restored = time.perf_counter()
        await wait_for_async(lambda: kernel._recovery is None, STEP_TIMEOUT, "the reconnect")
        listing = await loop.call(kernel._agent.request("list"))  # type: ignore[union-attr]
        [kept] = [k["kept"] for k in listing["kernels"] if k["kernel"] == kernel.kernel_id]
        await until_done(kc, cell)
        elapsed = time.perf_counter() - restored
        held_mib = kept["kept_bytes"] / (1 << 20) if kept else 0.0
        return elapsed, held_mib, held_kib / max(held_mib, 1e-9)


async def until_done(kc: Any, cell: str) -> None:
    """Read iopub (as a client does) until the cell's last line."""
    while True:
        msg = await kc.get_iopub_msg(timeout=STEP_TIMEOUT)
        ours = msg["parent_header"].get("msg_id") == cell and msg["msg_type"] == "stream"
        if ours and msg["content"]["text"].endswith("done\n"):
            return


def reap_once() -> float:
    """Seconds from SIGKILL of the local side to the remote kernel process being gone."""
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, REMOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        pid = int(server.stdout.readline())  # type: ignore[union-attr]
    finally:
        server.kill()
        server.wait(10)
    killed = time.perf_counter()
    deadline = killed + STEP_TIMEOUT
    while pid_alive(pid):
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise TimeoutError(f"remote kernel {pid} was not reaped")
        time.sleep(0.01)
    return time.perf_counter() - killed


def configure(env: Environment, **keys: Any) -> None:
    """Set provisioner config keys of the bench's remote spec."""
    path = env.root / "data" / "kernels" / REMOTE / "kernel.json"
    spec = json.loads(path.read_text())
    spec["metadata"]["kernel_provisioner"]["config"].update(keys)
    path.write_text(json.dumps(spec, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds sshd stays down")
    parser.add_argument("--missed", type=int, default=16, help="MiB printed while away")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    env = Environment()
    try:
        env.setup()
        configure(env, keepalive_interval=KEEPALIVE)
        cold = statistics.median(asyncio.run(local_cold_start()) for _ in range(args.runs))
        back = [asyncio.run(reconnect_once(env, args.outage)) for _ in range(args.runs)]
        live = [asyncio.run(missed_once(env, args.missed, away=False)) for _ in range(args.runs)]
        missed = [asyncio.run(missed_once(env, args.missed)) for _ in range(args.runs)]
        configure(env, orphan_timeout=ORPHAN_TIMEOUT)
        reaped = [reap_once() for _ in range(args.runs)]
    finally:
        env.close([])
    figures = {
        "local_cold_start_s": cold,
        "restored_to_first_execute_s": statistics.median(back),
        "restored_to_first_execute_runs": back,
        "ratio_to_local_cold_start": statistics.median(back) / cold,
        "killed_to_reaped_s": statistics.median(reaped),
        "killed_to_reaped_runs": reaped,
        "reaping_latency_beyond_orphan_timeout_s": statistics.median(reaped) - ORPHAN_TIMEOUT,
        "missed_mib_printed": args.missed,
        "restored_to_last_missed_message_s": statistics.median(m[0] for m in missed),
        "same_output_live_s": statistics.median(m[0] for m in live),
        "missed_mib_held_by_the_keeper": statistics.median(m[1] for m in missed),
        "daemon_kib_per_held_mib": statistics.median(m[2] for m in missed),
        "missed_runs": missed,
    }
    info = machine_info()
    print(f"# recovery, {info['date']}, {info['cpu']} x{info['nproc']}")
    print(f"outage {args.outage:g} s, keepalive_interval {KEEPALIVE:g} s, "
          f"orphan_timeout {ORPHAN_TIMEOUT:g} s, {args.runs} runs (medians)")  # fmt: skip
    print(f"local kernel cold start           {cold:7.3f} s")
    print(f"sshd back -> first execute        {figures['restored_to_first_execute_s']:7.3f} s"
          f"   ({figures['ratio_to_local_cold_start']:.2f} x local cold start, state kept)")  # fmt: skip
    print(f"{args.missed} MiB printed, client there: first to last line  "
          f"{figures['same_output_live_s']:7.3f} s")  # fmt: skip
    print(f"{args.missed} MiB printed while away: sshd back -> last line "
          f"{figures['restored_to_last_missed_message_s']:7.3f} s")  # fmt: skip
    print(f"remote daemon memory per MiB kept {figures['daemon_kib_per_held_mib'] / 1024:7.2f} MiB"
          f"   ({figures['missed_mib_held_by_the_keeper']:.1f} MiB kept)")  # fmt: skip
    print(f"local side killed -> reaped       {figures['killed_to_reaped_s']:7.3f} s"
          f"   (orphan_timeout + {figures['reaping_latency_beyond_orphan_timeout_s']:.3f} s)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
