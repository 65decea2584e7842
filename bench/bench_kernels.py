"""Benchmark a local ipykernel against the remote-ssh-provisioner kernel, in one run.

The remote kernel runs on this machine through a throwaway loopback sshd that the script
starts itself (``tests/sshd.py``), so the ratio remote/local is the cost of the provisioner:
SSH connection, agent, forwarding of the five ZMQ channels through asyncssh.

    python3 bench/bench_kernels.py [--quick] [--json PATH]

Only numbers are printed, nothing is asserted. Every wait is bounded, and everything the
script starts (sshd, kernels, temp dirs) is removed on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from jupyter_client.manager import AsyncKernelManager

from sshd import SshServer, current_user, generate_keypair, ssh_config_block

ALIAS = "benchhost"
LOCAL, REMOTE = "bench_local", "bench_remote"
REMOTE_BASE = Path(tempfile.gettempdir()) / f"jupyter-remote-{os.getuid()}"

START_TIMEOUT = 60.0  # start_kernel + wait_for_ready
MSG_TIMEOUT = 20.0  # one shell/iopub message
SHUTDOWN_TIMEOUT = 20.0
TOTAL_TIMEOUT = 300.0  # the whole measuring phase
SETTLE = 0.2  # seconds between the sleeping cell's marker and the interrupt
MIB = 1 << 20
RTT_BLOCK = 25  # round trips per side before switching to the other side


@dataclass
class Params:
    warm_starts: int = 3
    round_trips: int = 200
    stream_mib: int = 64
    stream_runs: int = 3
    interrupts: int = 3


QUICK = Params(warm_starts=1, round_trips=30, stream_mib=8, stream_runs=1, interrupts=1)


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    aim: str = "-"
    higher_is_better: bool = False
    limit: float | None = None  # aim on remote/local
    local: list[float] = field(default_factory=list)
    remote: list[float] = field(default_factory=list)
    stat: str = "median"  # how samples become the figure: median, p90, single

    def value(self, side: str) -> float | None:
        return summarize(self.local if side == "local" else self.remote, self.stat)

    def ratio(self) -> float | None:
        local, remote = self.value("local"), self.value("remote")
        if local is None or remote is None or local == 0:
            return None
        return remote / local

    def verdict(self) -> str:
        ratio = self.ratio()
        if self.limit is None or ratio is None:
            return ""
        met = ratio >= self.limit if self.higher_is_better else ratio <= self.limit
        return "met" if met else "MISSED"


def summarize(samples: list[float], stat: str) -> float | None:
    """The figure of ``samples``: their median, or p90 (``stat`` "p90"); None if none."""
    if not samples:
        return None
    if stat == "p90":
        return percentile(samples, 90)
    return statistics.median(samples)


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def make_figures(p: Params) -> dict[str, Figure]:
    figures = [
        Figure("cold_start", "cold start to ready (1st kernel)", "s", stat="single"),
        Figure("warm_start", f"warm start to ready (median of {p.warm_starts})", "s", "<= 1.3",
               limit=1.3),
        Figure("rtt_median", f"execute round trip, median of {p.round_trips}", "ms", "<= 1.2",
               limit=1.2),
        Figure("rtt_p90", f"execute round trip, p90 of {p.round_trips}", "ms", stat="p90"),
        Figure("stream", f"stream {p.stream_mib} MiB stdout, median of {p.stream_runs} (higher is better)", "MiB/s",
               ">= 0.8", higher_is_better=True, limit=0.8),
        Figure("interrupt", f"interrupt to KeyboardInterrupt (median of {p.interrupts})", "ms"),
        Figure("shutdown", f"graceful shutdown (median of {p.warm_starts})", "s"),
    ]  # fmt: skip
    return {f.key: f for f in figures}


# -- environment -------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("asyncssh", "jupyter_client", "ipykernel", "pyzmq", "jupyter-remote-provisioner"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        **versions,
    }


def write_kernelspec(kernels: Path, name: str, spec: dict[str, Any]) -> None:
    (kernels / name).mkdir(parents=True, exist_ok=True)
    (kernels / name / "kernel.json").write_text(json.dumps(spec, indent=1))


class Environment:
    """Temp dirs, Jupyter paths, kernelspecs and the loopback sshd; undone by close()."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="jrp-bench-"))
        self.server: SshServer | None = None
        self.saved_env = {
            k: os.environ.get(k) for k in ("JUPYTER_PATH", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
                                           "JUPYTER_CONFIG_DIR")
        }  # fmt: skip

    def setup(self) -> None:
        root = self.root
        data, runtime, config = root / "data", root / "runtime", root / "config"
        for d in (data, runtime, config):
            d.mkdir(parents=True)
        os.environ.update(
            JUPYTER_PATH=str(data),
            JUPYTER_DATA_DIR=str(data),
            JUPYTER_RUNTIME_DIR=str(runtime),
            JUPYTER_CONFIG_DIR=str(config),
        )
        ssh = root / "ssh"
        ssh.mkdir()
        key = generate_keypair(ssh / "id_ed25519")
        # An empty HOME: sessions skip the user's shell startup files, as in the tests.
        home = ssh / "home"
        home.mkdir()
        self.server = SshServer(
            ssh / "sshd", authorized_keys=Path(f"{key}.pub"), session_env={"HOME": str(home)}
        )
        self.server.start()
        known_hosts = ssh / "known_hosts"
        known_hosts.write_text(self.server.known_hosts_line())
        options = {
            "HostName": self.server.host,
            "Port": self.server.port,
            "User": current_user(),
            "IdentityFile": key,
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": known_hosts,
            "StrictHostKeyChecking": "yes",
        }
        ssh_config = ssh / "ssh_config"
        ssh_config.write_text(ssh_config_block(ALIAS, options))
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernels = data / "kernels"
        write_kernelspec(
            kernels,
            LOCAL,
            {"argv": argv, "display_name": "bench local", "language": "python",
             "interrupt_mode": "signal"},
        )  # fmt: skip
        # The remote side is this machine; sshd's PATH has a python3 without ipykernel
        # (and pyenv shims are slow shell scripts), so run the same interpreter as local.
        config = {"host": ALIAS, "ssh_config": str(ssh_config), "python": sys.executable}
        write_kernelspec(
            kernels,
            REMOTE,
            {
                "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "bench remote",
                "language": "python",
                "interrupt_mode": "signal",
                "metadata": {
                    "kernel_provisioner": {
                        "provisioner_name": "remote-ssh-provisioner",
                        "config": config,
                    }
                },
            },
        )

    def close(self, remote_kernel_ids: list[str]) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.close()  # also kills whatever its sessions started
        for kid in remote_kernel_ids:  # kernel dirs the agent had no chance to remove
            for d in REMOTE_BASE.glob(f"{kid[:8]}-*"):
                shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- kernels -----------------------------------------------------------------------------


class Kernels:
    """Every kernel manager started, so that all of them can be shut down at the end."""

    def __init__(self) -> None:
        self.live: list[tuple[AsyncKernelManager, Any]] = []
        self.remote_ids: list[str] = []
        self.local_procs: list[Any] = []  # Popen of each local kernel

    async def start(self, name: str) -> tuple[AsyncKernelManager, Any, float]:
        """Start a kernel and a client; return them and the seconds to ready."""
        km = AsyncKernelManager(kernel_name=name)
        t0 = time.perf_counter()
        self.live.append((km, None))
        try:
            await asyncio.wait_for(km.start_kernel(), START_TIMEOUT)
        finally:
            if name == REMOTE and km.kernel_id:
                self.remote_ids.append(km.kernel_id)
            process = getattr(km.provisioner, "process", None)
            if name == LOCAL and process is not None:
                self.local_procs.append(process)
        kc = km.client()
        self.live[-1] = (km, kc)
        kc.start_channels()
        await kc.wait_for_ready(timeout=START_TIMEOUT)
        elapsed = time.perf_counter() - t0
        return km, kc, elapsed

    async def shutdown(self, km: AsyncKernelManager, kc: Any, now: bool = False) -> float:
        """Stop the client, shut the kernel down; return the seconds km.shutdown_kernel took."""
        self.live = [(k, c) for k, c in self.live if k is not km]
        if kc is not None:
            kc.stop_channels()
        t0 = time.perf_counter()
        await asyncio.wait_for(km.shutdown_kernel(now=now), SHUTDOWN_TIMEOUT)
        return time.perf_counter() - t0

    async def shutdown_all(self) -> None:
        while self.live:
            km, kc = self.live[-1]
            try:
                if await km.is_alive():
                    await self.shutdown(km, kc, now=True)
                else:
                    self.live.pop()
                    await asyncio.wait_for(km.cleanup_resources(), SHUTDOWN_TIMEOUT)
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 (clean up the others)
                print(f"  warning: shutting down kernel {km.kernel_id}: {exc!r}", file=sys.stderr)
                if self.live and self.live[-1][0] is km:
                    self.live.pop()

    def kill_local_leftovers(self) -> None:
        """Last resort for local kernels (remote ones die with the sshd's sessions)."""
        for process in self.local_procs:
            if process.poll() is None:  # not reaped yet, so its pid is still its own
                with contextlib.suppress(OSError):
                    process.kill()
                with contextlib.suppress(Exception):
                    process.wait(5)


async def iopub_until_idle(kc: Any, msg_id: str, on_msg: Any = None) -> None:
    """Consume iopub until the idle status of ``msg_id``."""
    while True:
        msg = await kc.get_iopub_msg(timeout=MSG_TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if on_msg is not None:
            on_msg(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return


async def shell_reply(kc: Any, msg_id: str) -> dict[str, Any]:
    while True:
        msg = await kc.get_shell_msg(timeout=MSG_TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


async def round_trip(kc: Any, code: str = "pass") -> float:
    """Seconds from sending execute_request until both its reply and its idle arrived."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code, store_history=False)
    reply, _ = await asyncio.gather(shell_reply(kc, msg_id), iopub_until_idle(kc, msg_id))
    elapsed = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"execute failed: {reply['content']}")
    return elapsed


async def stream(kc: Any, mib: int) -> float:
    """Run a cell writing ``mib`` MiB to stdout; return MiB/s of stream text received."""
    code = (
        "import sys\n"
        f"_line = 'x' * ({MIB} - 1) + '\\n'\n"
        f"for _ in range({mib}):\n"
        "    sys.stdout.write(_line)\n"
        "sys.stdout.flush()\n"
        "del _line\n"
    )
    received = 0

    def on_msg(msg: dict[str, Any]) -> None:
        nonlocal received
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            received += len(msg["content"]["text"].encode())

    t0 = time.perf_counter()
    msg_id = kc.execute(code, store_history=False)
    reply, _ = await asyncio.gather(shell_reply(kc, msg_id), iopub_until_idle(kc, msg_id, on_msg))
    elapsed = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"stream cell failed: {reply['content']}")
    if received != mib * MIB:
        raise RuntimeError(f"stream: received {received} bytes of stdout, expected {mib * MIB}")
    return mib / elapsed


async def interrupt(km: AsyncKernelManager, kc: Any) -> float:
    """Seconds from interrupt_kernel() until the KeyboardInterrupt execute_reply arrives."""
    marker = "bench-sleeping"
    msg_id = kc.execute(
        f"import time\nprint({marker!r}, flush=True)\ntime.sleep(60)", store_history=False
    )
    while True:  # wait until the cell runs (its printed marker is on iopub)
        msg = await kc.get_iopub_msg(timeout=MSG_TIMEOUT)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "stream"
            and marker in msg["content"]["text"]
        ):
            break
    # The marker arrives while the kernel's print() may still wait for its IO thread; a
    # SIGINT in that window can be swallowed (seen once with ipykernel 7.4). Let it sleep.
    await asyncio.sleep(SETTLE)
    t0 = time.perf_counter()
    await asyncio.wait_for(km.interrupt_kernel(), MSG_TIMEOUT)
    reply = await shell_reply(kc, msg_id)
    elapsed = time.perf_counter() - t0
    await iopub_until_idle(kc, msg_id)
    if reply["content"].get("ename") != "KeyboardInterrupt":
        raise RuntimeError(f"interrupt: unexpected reply {reply['content']}")
    return elapsed


# -- the run -----------------------------------------------------------------------------


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


async def measure(p: Params, figures: dict[str, Figure], kernels: Kernels) -> None:
    main = {}
    for side, name in (("local", LOCAL), ("remote", REMOTE)):
        km, kc, seconds = await kernels.start(name)
        getattr(figures["cold_start"], side).append(seconds)
        main[side] = (km, kc)
        progress(f"{side}: cold start {seconds:.2f} s")

    for side, name in (("local", LOCAL), ("remote", REMOTE)):
        for _ in range(p.warm_starts):
            km, kc, seconds = await kernels.start(name)
            getattr(figures["warm_start"], side).append(seconds)
            down = await kernels.shutdown(km, kc)
            getattr(figures["shutdown"], side).append(down)
            progress(f"{side}: warm start {seconds:.2f} s, shutdown {down:.2f} s")

    sides = ("local", "remote")  # interleaved below, so drift hits both sides alike
    for side in sides:  # warm-up, not counted
        km, kc = main[side]
        for _ in range(10):
            await round_trip(kc)
        await stream(kc, min(8, p.stream_mib))
        await interrupt(km, kc)  # the first KeyboardInterrupt of a kernel is slower
    # Round trips in alternating blocks: per-sample alternation would let one kernel's
    # after-reply work (it goes on for a while after idle) steal CPU from the other's sample.
    for start in range(0, p.round_trips, RTT_BLOCK):
        for side in sides:
            for _ in range(min(RTT_BLOCK, p.round_trips - start)):
                ms = await round_trip(main[side][1]) * 1000
                getattr(figures["rtt_median"], side).append(ms)
                getattr(figures["rtt_p90"], side).append(ms)
    for side in sides:
        median = statistics.median(getattr(figures["rtt_median"], side))
        progress(f"{side}: round trip median {median:.2f} ms")
    for _ in range(p.stream_runs):
        for side in sides:
            rate = await stream(main[side][1], p.stream_mib)
            getattr(figures["stream"], side).append(rate)
            progress(f"{side}: stream {rate:.1f} MiB/s")
    for _ in range(p.interrupts):
        for side in sides:
            ms = await interrupt(*main[side]) * 1000
            getattr(figures["interrupt"], side).append(ms)
            progress(f"{side}: interrupt {ms:.1f} ms")


async def run(p: Params, figures: dict[str, Figure], kernels: Kernels) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await asyncio.wait_for(measure(p, figures, kernels), TOTAL_TIMEOUT)
    finally:
        progress("shutting down kernels")
        await kernels.shutdown_all()


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def print_table(info: dict[str, str], figures: dict[str, Figure], quick: bool) -> None:
    print(f"date: {info['date']}   host: {info['host']}{'   (--quick)' if quick else ''}")
    print(f"machine: {info['nproc']} CPU(s), {info['cpu']}")
    print(
        f"python {info['python']}, asyncssh {info['asyncssh']}, jupyter_client "
        f"{info['jupyter_client']}, ipykernel {info['ipykernel']}, pyzmq {info['pyzmq']}"
    )
    rows = [("figure", "unit", "local", "remote", "remote/local", "aim")]
    for f in figures.values():
        ratio = f.ratio()
        aim = f"{f.aim} {f.verdict()}".strip()
        rows.append(
            (f.label, f.unit, fmt(f.value("local")), fmt(f.value("remote")),
             "n/a" if ratio is None else f"{ratio:.2f}", aim)
        )  # fmt: skip
    print_rows(rows, numeric=range(2, 5))


def print_rows(rows: list[tuple[str, ...]], numeric: range) -> None:
    """Print a table: a header row, a rule, then rows; ``numeric`` columns right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def results_json(info: dict[str, str], figures: dict[str, Figure], p: Params, quick: bool) -> dict:
    return {
        "machine": info,
        "quick": quick,
        "params": p.__dict__,
        "figures": {
            f.key: {
                "label": f.label,
                "unit": f.unit,
                "local": f.value("local"),
                "remote": f.value("remote"),
                "ratio": f.ratio(),
                "aim": f.aim,
                "higher_is_better": f.higher_is_better,
                "verdict": f.verdict() or None,
                "samples": {"local": f.local, "remote": f.remote},
            }
            for f in figures.values()
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args()


def measure_and_report(
    args: argparse.Namespace,
    env: Any,
    kernels: Any,
    work: Callable[[], Coroutine[Any, Any, None]],
    report: Callable[[], None],
    results: Callable[[], dict[str, Any]],
) -> int:
    """Set up ``env``, run ``work()``, always clean up, then ``report()`` what was measured
    (partial results too); returns the exit status (130 interrupted, 1 error)."""
    status = 0
    started = time.monotonic()
    try:
        progress(f"setting up in {env.root}")
        env.setup()
        asyncio.run(work())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; partial results below", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001 (report, clean up, print partial results)
        print(f"error: {exc!r}; partial results below", file=sys.stderr)
        status = 1
    finally:
        # Cleanup must finish even if Ctrl-C is pressed again meanwhile.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            kernels.kill_local_leftovers()
            env.close(kernels.remote_ids)
        finally:
            signal.signal(signal.SIGINT, previous)
    print()
    report()
    print(f"(total {time.monotonic() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results(), indent=1))
        print(f"results written to {args.json}")
    return status


def main() -> int:
    args = parse_args()
    p = QUICK if args.quick else Params()
    figures = make_figures(p)
    info = machine_info()
    kernels = Kernels()
    return measure_and_report(
        args,
        Environment(),
        kernels,
        lambda: run(p, figures, kernels),
        lambda: print_table(info, figures, args.quick),
        lambda: results_json(info, figures, p, args.quick),
    )


if __name__ == "__main__":
    sys.exit(main())
