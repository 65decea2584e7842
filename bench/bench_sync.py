"""Sync figures: `remote_kernel sync` against `scp` on the same link, in one run, as ratios.

    python3 bench/bench_sync.py [--runs N] [--mib 256] [--files 2000] [--json PATH]

The link is a throwaway loopback sshd (as in bench_kernels.py); the files live on tmpfs
(``--dir``), so the link is measured rather than the disk. Each case copies to a fresh
destination and is timed end to end as a user runs it (process start, SSH connection,
transfer): one byte (the fixed costs), one large file of random bytes, and a tree of small
files (``scp -r``). scp runs
twice: with OpenSSH's default cipher (what a user gets) and with AES-GCM (the cipher this
package prefers), so the ratio is not only a cipher choice. A re-sync of the unchanged tree
and a pull of the large file are timed too. Only numbers are printed; every command is
bounded and everything is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import ALIAS, REMOTE, Environment, machine_info

COMMAND_TIMEOUT = 300.0
MIB = 1 << 20
SMALL_FILE = 4096  # bytes per file of the tree
FILES_PER_DIR = 100
GCM = "aes128-gcm@openssh.com"


def timed(argv: list[str]) -> float:
    """Seconds one command takes; it must succeed."""
    started = time.perf_counter()
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return elapsed


def median_fresh(runs: int, dest: Path, command: Callable[[], list[str]]) -> float:
    """Median time of ``command`` copying into a destination removed before each run."""
    times = []
    for _ in range(runs):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        times.append(timed(command()))
    return statistics.median(times)


def make_inputs(root: Path, mib: int, files: int) -> tuple[Path, Path]:
    root.mkdir(parents=True)
    big = root / "big.bin"
    with big.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
    tree = root / "tree"
    for index in range(files):
        sub = tree / f"d{index // FILES_PER_DIR:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{index:05d}.txt").write_bytes(os.urandom(SMALL_FILE))
    return big, tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256, help="size of the large file")
    parser.add_argument("--files", type=int, default=2000, help="files in the tree")
    parser.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
        help="where the files are copied from and to (default: /dev/shm, so that the link is "
        "measured, not the disk)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    env = Environment()
    work = Path(tempfile.mkdtemp(prefix="jrp-bench-sync-", dir=args.dir))
    try:
        env.setup()
        ssh_config = str(env.root / "ssh" / "ssh_config")
        big, tree = make_inputs(work / "in", args.mib, args.files)
        tiny = work / "in" / "tiny.txt"
        tiny.write_text("x")
        out = work / "out"
        sync = [sys.executable, "-m", "jupyter_remote_provisioner", "sync", REMOTE]
        scp = ["scp", "-q", "-F", ssh_config]
        scp_gcm = [*scp, "-c", GCM]
        runs = args.runs
        figures = {
            "tiny_sync_s": median_fresh(runs, out, lambda: [*sync, str(tiny), f"{out}/"]),
            "tiny_scp_s": median_fresh(runs, out, lambda: [*scp, str(tiny), f"{ALIAS}:{out}/"]),
            "big_sync_s": median_fresh(runs, out, lambda: [*sync, str(big), f"{out}/"]),
            "big_scp_s": median_fresh(runs, out, lambda: [*scp, str(big), f"{ALIAS}:{out}/"]),
            "big_scp_gcm_s": median_fresh(
                runs, out, lambda: [*scp_gcm, str(big), f"{ALIAS}:{out}/"]
            ),
            "tree_sync_s": median_fresh(runs, out, lambda: [*sync, str(tree), f"{out}/tree"]),
            "tree_scp_s": median_fresh(
                runs, out, lambda: [*scp, "-r", str(tree), f"{ALIAS}:{out}/"]
            ),
            "tree_scp_gcm_s": median_fresh(
                runs, out, lambda: [*scp_gcm, "-r", str(tree), f"{ALIAS}:{out}/"]
            ),
        }
        timed([*sync, str(tree), f"{out}/tree"])  # the last scp replaced the times
        figures["tree_resync_s"] = statistics.median(
            timed([*sync, str(tree), f"{out}/tree"]) for _ in range(runs)
        )
        back = work / "back"
        figures["big_pull_s"] = median_fresh(
            runs, back, lambda: [*sync, str(big), f"{back}/", "--pull"]
        )
        figures["big_scp_pull_s"] = median_fresh(
            runs, back, lambda: [*scp, f"{ALIAS}:{big}", f"{back}/"]
        )
    finally:
        env.close([])
        shutil.rmtree(work, ignore_errors=True)
    size = args.mib * MIB
    tree_bytes = args.files * SMALL_FILE

    def rate(seconds: float, total: int) -> str:
        return f"{total / MIB / seconds:7.1f} MiB/s"

    info = machine_info()
    print(f"# sync vs scp, {info['date']}, {info['cpu']} x{info['nproc']}, loopback sshd")
    print(f"{args.runs} runs each (medians) in {args.dir}, wall time of the whole command; "
          f"ratio = sync/scp")  # fmt: skip
    print(
        f"{'1 byte (fixed costs)':28s} sync {figures['tiny_sync_s']:6.3f} s{'':20s}"
        f"scp {figures['tiny_scp_s']:6.3f} s ({figures['tiny_sync_s'] / figures['tiny_scp_s']:.2f})"
    )
    rows = [
        (f"{args.mib} MiB file, push", "big_sync_s", "big_scp_s", "big_scp_gcm_s", size),
        (f"{args.files} x {SMALL_FILE} B tree, push", "tree_sync_s", "tree_scp_s",
         "tree_scp_gcm_s", tree_bytes),
    ]  # fmt: skip
    for label, mine, theirs, gcm, total in rows:
        print(
            f"{label:28s} sync {figures[mine]:6.3f} s ({rate(figures[mine], total)})  "
            f"scp {figures[theirs]:6.3f} s ({figures[mine] / figures[theirs]:.2f})  "
            f"scp -c {GCM} {figures[gcm]:6.3f} s ({figures[mine] / figures[gcm]:.2f})"
        )
    print(
        f"{'tree re-sync, unchanged':28s} sync {figures['tree_resync_s']:6.3f} s"
        f"{'':22s}scp -r recopies: {figures['tree_resync_s'] / figures['tree_scp_s']:.2f}"
    )
    print(
        f"{f'{args.mib} MiB file, pull':28s} sync {figures['big_pull_s']:6.3f} s "
        f"({rate(figures['big_pull_s'], size)})  scp {figures['big_scp_pull_s']:6.3f} s "
        f"({figures['big_pull_s'] / figures['big_scp_pull_s']:.2f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
