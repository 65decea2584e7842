"""Time from "start" to a ready kernel on an idle Slurm cluster, split into its steps, next
to a plain SSH kernel on the same login node, in one run.

The cluster is the test suite's (``tests/slurm_cluster.py``: a login node with sshd and
slurmctld, two compute nodes with slurmd, each in its network namespace; needs root and
Debian's slurm packages, see ``.ci/setup --tests``). Each start goes through jupyter_client's
``AsyncKernelManager`` and ends when ``wait_for_ready`` returns, as JupyterLab's first
kernel_info. The steps, from the kernel's ``phases``:

- ssh: the SSH connection to the login node;
- queue wait: ``sbatch`` until the job runs (for the plain kernel: nothing);
- node start: the agent's hello (in the job: srun, the relay, the job's daemon);
- kernel start: ipykernel started and listening;
- client: the rest, until the first kernel_info reply through the forwards.

    python3 bench/bench_slurm.py [--runs N] [--json PATH]

Only numbers are printed, nothing is asserted. Each start finds the cluster idle (the
previous job has left the nodes). Everything is removed on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from jupyter_client.manager import AsyncKernelManager

from slurm_cluster import SlurmCluster

STEPS = ("ssh", "place", "agent", "kernel", "client")
NAMES = {"ssh": "ssh", "place": "queue wait", "agent": "node start", "kernel": "kernel start",
         "client": "client", "total": "total"}  # fmt: skip


def write_spec(kernels: Path, name: str, cluster: SlurmCluster, slurm: bool) -> None:
    config: dict[str, Any] = {
        "host": cluster.alias, "ssh_config": str(cluster.ssh_config), "python": sys.executable,
        "connection_persist": 0,
    }  # fmt: skip
    if slurm:
        config["slurm"] = {"cpus": 1}
    spec = {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "remote-ssh-provisioner", "config": config},
            "supported_encryption": ["curve"],
        },
    }  # fmt: skip
    (kernels / name).mkdir(parents=True)
    (kernels / name / "kernel.json").write_text(json.dumps(spec))


async def one_start(name: str) -> dict[str, float]:
    """Start, wait for the first kernel_info reply, shut down; the seconds of each step."""
    km = AsyncKernelManager(kernel_name=name)
    began = time.monotonic()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        total = time.monotonic() - began
        phases = dict(km.provisioner._kernel.phases)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    phases["client"] = total - sum(phases.get(step, 0.0) for step in STEPS[:-1])
    phases["total"] = total
    return phases


def run(runs: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as jupyter, SlurmCluster() as cluster:
        kernels = Path(jupyter, "kernels")
        os.environ.update(JUPYTER_PATH=jupyter, JUPYTER_DATA_DIR=jupyter,
                          JUPYTER_RUNTIME_DIR=str(Path(jupyter, "runtime")))  # fmt: skip
        for name, slurm in (("plain", False), ("slurm", True)):
            write_spec(kernels, name, cluster, slurm)
        asyncio.run(one_start("slurm"))  # warm-up: slurmctld's first scheduling pass is slow
        cluster.wait_idle()
        samples: dict[str, list[dict[str, float]]] = {"plain": [], "slurm": []}
        for _ in range(runs):
            for name, rows in samples.items():
                rows.append(asyncio.run(one_start(name)))
                cluster.wait_idle()
        for name, rows in samples.items():
            keys = [*STEPS, "total"]
            results[name] = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    return results


def report(results: dict[str, dict[str, float]], runs: int) -> None:
    print(f"Start to ready on an idle cluster, median of {runs} (seconds)")
    print(f"{'step':<14}{'plain SSH kernel':>18}{'Slurm kernel':>14}")
    for key in (*STEPS, "total"):
        plain, slurm = results["plain"][key], results["slurm"][key]
        print(f"{NAMES[key]:<14}{plain:>18.3f}{slurm:>14.3f}")
    ratio = results["slurm"]["total"] / results["plain"]["total"]
    print(f"Slurm / plain (total): {ratio:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts of each kind (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    results = run(args.runs)
    report(results, args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
