"""Slurm's own commands on the login node, run over the kernel's SSH connection: submit a
job, look it up, cancel it, read its output. Every answer is parsed here, and every failure
becomes one line that says what Slurm said."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from dataclasses import dataclass

import asyncssh

from ..agent import bootstrap_input, remote_command
from ..errors import ConnectError, LaunchError
from ..ssh import Connection

COMMAND_TIMEOUT = 30.0  # seconds for one Slurm command on the login node
EXIT_COMMAND_NOT_FOUND = 127
OUTPUT_DIR = '"$HOME"/.cache/jupyter-remote-provisioner'  # a job's output, until it is read
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING", "REQUEUED",
          "RESIZING", "SIGNALING", "STAGE_OUT")  # fmt: skip
ENDINGS = {
    "TIMEOUT": "reached its time limit ({limit})",
    "CANCELLED": "was cancelled (scancel, by you or an administrator)",
    "PREEMPTED": "was preempted by another job",
    "NODE_FAIL": "lost its node {node} (NODE_FAIL)",
    "BOOT_FAIL": "could not boot its node {node} (BOOT_FAIL)",
    "OUT_OF_MEMORY": "ran out of memory (OUT_OF_MEMORY; ask for more `mem`)",
    "DEADLINE": "reached its deadline",
    "FAILED": "failed (exit code {exit_code})",
    "COMPLETED": "ended (COMPLETED)",
}


@dataclass(frozen=True)
class JobInfo:
    """One job as ``scontrol show job`` tells it."""

    job_id: int
    name: str
    state: str
    reason: str
    node: str  # the node the batch script runs on ("" while pending)
    time_limit: str  # as Slurm writes it: "4:00:00", "1-00:00:00", "UNLIMITED"
    run_time: str
    exit_code: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    def ending(self) -> str:
        """Why the job ended, as one line: "Slurm job 12 reached its time limit (0:01:00)"."""
        phrase = ENDINGS.get(self.state, f"ended ({self.state})")
        fields = {"limit": self.time_limit, "node": self.node or "?", "exit_code": self.exit_code}
        return f"Slurm job {self.job_id} {phrase.format(**fields)}"

    def seconds_left(self) -> float | None:
        """Time until the limit (None: no limit, or unknown)."""
        limit, used = duration(self.time_limit), duration(self.run_time)
        return None if limit is None or used is None else max(0.0, limit - used)


def duration(text: str) -> float | None:
    """Seconds in a Slurm duration ("[days-]hours:minutes:seconds", "minutes:seconds")."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if match is None:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def parse_job(text: str) -> JobInfo | None:
    """The first job in ``scontrol show job -o`` output, or None."""
    line = text.strip().splitlines()[0] if text.strip() else ""

    def field(name: str) -> str:
        match = re.search(rf"(?:^|\s){name}=(\S*)", line)
        return match.group(1) if match else ""

    if not field("JobId").isdigit():
        return None
    node = field("BatchHost") or field("NodeList")
    return JobInfo(
        int(field("JobId")), field("JobName"), field("JobState"), field("Reason"), "" if node == "(null)" else node,
        field("TimeLimit"), field("RunTime"), field("ExitCode"),
    )  # fmt: skip


async def run(conn: Connection, command: str, what: str, stdin: bytes | None = None) -> str:
    """Run ``command`` on the login node; its stdout, or one line with Slurm's complaint."""
    assert conn.ssh is not None
    login = conn.target.host.label
    try:
        result = await asyncio.wait_for(
            conn.ssh.run(command, input=stdin, check=False, encoding=None), COMMAND_TIMEOUT
        )
    except asyncio.TimeoutError:
        raise ConnectError(
            f"{what} on {login} did not answer within {COMMAND_TIMEOUT:g} s"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        raise ConnectError(f"cannot run {what} on {login}: {exc}") from None
    stdout = _text(result.stdout)
    if result.exit_status == EXIT_COMMAND_NOT_FOUND:
        raise LaunchError(
            f"{what.split()[0]} was not found on {login}: `host` must be a Slurm login node "
            f"(one where sbatch, squeue and scancel work in an SSH session)"
        )
    if result.exit_status != 0:
        said = _text(result.stderr) or stdout
        complaint = _complaint(said) or f"exit status {result.exit_status}"
        raise LaunchError(f"Slurm on {login} refused {what}: {complaint}")
    return stdout


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _complaint(stderr: str) -> str:
    """Slurm's own reason, from lines like "sbatch: error: Batch job submission failed: X"."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    if not errors:
        return ""
    last = errors[-1]
    return re.sub(r"^.*?error:\s*(Batch job submission failed:\s*)?", "", last) or last


def output_path(job_id: int | str) -> str:
    """Where a job's output goes (shell syntax: $HOME is expanded on the login node)."""
    return f"{OUTPUT_DIR}/slurm-{job_id}.out"


async def sbatch(conn: Connection, args: list[str], script: bytes) -> int:
    """Submit ``script`` with ``args``; the job id."""
    quoted = " ".join(shlex.quote(arg) for arg in ["--parsable", *args])
    command = (
        f"mkdir -p {OUTPUT_DIR} && chmod 700 {OUTPUT_DIR} && "
        f"exec sbatch {quoted} --output={output_path('%j')}"
    )
    stdout = await run(conn, command, "sbatch " + " ".join(args), script)
    job = stdout.strip().split(";")[0]
    if not job.isdigit():
        raise LaunchError(f"sbatch on {conn.target.host.label} printed no job id: {stdout!r}")
    return int(job)


async def test_only(conn: Connection, args: list[str]) -> str:
    """What ``sbatch --test-only`` says of a request ("Job 12 to start at … on nodes n1 in
    partition gpu"); a LaunchError with Slurm's reason if the request cannot run."""
    quoted = " ".join(shlex.quote(arg) for arg in ["--test-only", *args])
    said = await run(conn, f"sbatch {quoted} 2>&1", "the request", b"#!/bin/sh\ntrue\n")
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    return re.sub(r"^sbatch:\s*", "", lines[-1]) if lines else "accepted"


def in_job(job_id: int) -> tuple[str, ...]:
    """The argv prefix that runs a command as one more step of the job, beside the others."""
    return ("srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet")


async def start_step_daemon(conn: Connection, job_id: int, python: str) -> None:
    """Start the agent's daemon in an allocation as a step of its own, detached from this
    SSH session (srun stays on the login node for the step's life); it reads its bundle from
    a file that is gone before the step starts."""
    step = remote_command(python, "jobdaemon", in_job(job_id))
    command = (
        'f=$(mktemp) && cat > "$f" && exec 3<"$f" && rm -f "$f" && '
        f"(setsid sh -c {shlex.quote(step)} <&3 >/dev/null 2>&1 &)"
    )
    await run(conn, command, "srun (the agent's daemon)", bootstrap_input())


async def job_info(conn: Connection, job_id: int) -> JobInfo | None:
    """The job as Slurm knows it; None once Slurm has forgotten it (MinJobAge after its end)."""
    command = f"scontrol show job -o {job_id} 2>&1 || true"
    return parse_job(await run(conn, command, "scontrol show job"))


async def final_info(conn: Connection, job_id: int, timeout: float) -> JobInfo | None:
    """The job once it has ended: Slurm shows an ending job as COMPLETING, and how it ended
    (CANCELLED, TIMEOUT, ...) only when its processes are gone; waited for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    info = await job_info(conn, job_id)
    while info is not None and info.state == "COMPLETING" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        info = await job_info(conn, job_id)
    return info


async def our_jobs(conn: Connection, prefix: str) -> list[JobInfo]:
    """The user's jobs whose name starts with ``prefix``, as scontrol tells them."""
    command = "squeue --me --noheader --format='%i %j' 2>&1"
    listing = await run(conn, command, "squeue")
    ids = [int(f[0]) for f in (line.split() for line in listing.splitlines())
           if len(f) == 2 and f[0].isdigit() and f[1].startswith(prefix)]  # fmt: skip
    infos = await asyncio.gather(*(job_info(conn, job) for job in ids))
    return [info for info in infos if info is not None]


async def job_named(conn: Connection, name: str) -> JobInfo | None:
    """The user's active job called ``name``, if any."""
    for info in await our_jobs(conn, name):
        if info.name == name and info.active:
            return info
    return None


async def scancel(conn: Connection, job_id: int) -> None:
    """Ask Slurm to end the job (one that is already ending is no error: callers wait)."""
    await run(conn, f"scancel {job_id} 2>/dev/null || true", f"scancel {job_id}")


async def output_tail(conn: Connection, job_id: int, limit: int = 2000) -> str:
    """The end of a job's output ("" if there is none here: a home not shared with nodes)."""
    path = output_path(job_id)
    text = await run(conn, f"tail -c {limit} {path} 2>/dev/null || true", "tail")
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


async def remove_output(conn: Connection, job_id: int) -> None:
    await run(conn, f"rm -f {output_path(job_id)}", "rm")
