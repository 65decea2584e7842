"""The command line's part of Slurm kernels: ``add --slurm-*`` flags and what ``show`` prints."""

from __future__ import annotations

import argparse
from typing import Any

from .sites.slurm_request import EXAMPLES, FLAGS, SlurmRequest

HELP = {
    "partition": "Slurm partition to run the kernel in",
    "time": "time limit of the kernel's job, as sbatch --time takes it",
    "gpus": "GPUs for the kernel (sbatch --gpus: a count, or TYPE:COUNT)",
    "gres": "generic resources (sbatch --gres)",
    "cpus": "CPUs for the kernel (sbatch --cpus-per-task)",
    "mem": "memory for the kernel (sbatch --mem)",
    "account": "account to charge (sbatch --account)",
    "qos": "quality of service (sbatch --qos)",
    "constraint": "node features required (sbatch --constraint)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--slurm-KEY VALUE`` per request key, ``--slurm-option FLAG`` and the queue limit.
    Any of them makes the spec a Slurm kernel: ENDPOINT is then the login node."""
    group = parser.add_argument_group(
        "Slurm", "run the kernel in a Slurm job submitted through ENDPOINT (a login node)"
    )
    for key in FLAGS:
        group.add_argument(
            f"--slurm-{key}", metavar=key.upper(), help=f"{HELP[key]} (e.g. {EXAMPLES[key]})"
        )
    group.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more sbatch flag, e.g. --slurm-option=--exclusive; repeat for more",
    )
    group.add_argument(
        "--slurm-job",
        metavar="JOBID",
        help="run the kernel in this allocation of yours (from salloc) instead of a new job",
    )
    group.add_argument(
        "--slurm-queue-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a kernel start may wait in the queue (default: 3600)",
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The spec's ``slurm`` mapping, validated; None when no --slurm-* flag was given."""
    config: dict[str, Any] = {
        key: getattr(args, f"slurm_{key}") for key in FLAGS if getattr(args, f"slurm_{key}")
    }
    if args.slurm_option:
        config["options"] = list(args.slurm_option)
    if args.slurm_queue_timeout is not None:
        config["queue_timeout"] = args.slurm_queue_timeout
    if args.slurm_job is not None:
        config["job"] = args.slurm_job
    if not config:
        return None
    return SlurmRequest.from_config(config, _flag).as_config()


def _flag(key: str) -> str:
    """The command-line flag of a ``slurm`` key."""
    return "--slurm-" + ("option" if key == "options" else key.replace("_", "-"))


def describe(request: SlurmRequest | None, login: str) -> list[str]:
    """``show``'s lines about where the kernel runs."""
    if request is None:
        return []
    if request.job is not None:
        return [f"slurm: in your allocation, Slurm job {request.job}, through {login}"]
    asked = ", ".join(f"{key}={value}" for key, value in request.values) or "the defaults"
    return [
        f"slurm: one job per kernel, submitted on {login}: {asked}",
        f"  equivalent: {request.sbatch_line()}",
        f"  queue wait allowed: {request.queue_timeout:g} s",
    ]
