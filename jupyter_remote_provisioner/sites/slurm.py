"""A compute node of a Slurm cluster: one job per kernel, submitted through the login node.

The job's batch script is the remote agent's daemon (see ``remote/job.py``): the kernel is
its child, so it gets the job's CPUs, memory and GPUs, and restarts happen inside the same
allocation. The agent is reached with ``srun --jobid=J --overlap`` over the SSH connection
to the login node, and the kernel's ports are forwarded from the login node to the node's
address, where CurveZMQ keeps them private from other users of the cluster. The job ends
when the kernel is shut down (scancel), or when its daemon is left with no kernel (the
orphan rule reaped it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from ..agent import RemoteAgent, bootstrap_input, remote_command
from ..errors import KernelGone, LaunchError, RemoteKernelError
from . import Spot, stop_through_agent
from .slurm_jobs import (
    JobInfo,
    final_info,
    in_job,
    job_info,
    job_named,
    our_jobs,
    output_tail,
    remove_output,
    sbatch,
    scancel,
    start_step_daemon,
)

if TYPE_CHECKING:
    from ..kernel_settings import KernelSettings
    from ..ssh import Connection

# seconds between looks at a pending job: often while a start is likely (slurmctld schedules
# about every second), then doubling up to a pause that spares slurmctld over long waits
POLL_FAST, POLL_FAST_FOR, POLL_MAX = 0.2, 5.0, 5.0
CANCEL_WAIT = 10.0  # seconds a shutdown waits for a cancelled job to leave the queue
WARN_BEFORE = (900, 300, 60, 20)  # seconds before the time limit to warn, when they fit
# reasons a pending job gives when it can never start as asked
NEVER = {
    "PartitionConfig": "more than the partition's nodes or limits allow",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a longer time than the partition allows",
    "BadConstraints": "constraints no node has",
    "InvalidAccount": "an account that does not exist",
    "InvalidQOS": "a QOS that does not exist",
    "AccountNotAllowed": "an account the partition does not allow",
    "QOSNotAllowed": "a QOS the partition does not allow",
}
JOB_PREFIX = "jrp-"  # job names: jrp-<kernel id>, which `ps` reads back


class SlurmSite:
    """The job that holds one kernel, from submission to its end."""

    def __init__(self, kernel_id: str, settings: KernelSettings, log: logging.Logger) -> None:
        assert settings.slurm is not None
        self.kernel_id, self.settings, self.log = kernel_id, settings, log
        self.request = settings.slurm
        self.job: JobInfo | None = None
        self._ended = ""  # why the job ended, once logged
        self._warnings: asyncio.Task[None] | None = None
        self._explaining: asyncio.Future[str | None] | None = None  # see _gone

    @staticmethod
    def spot_of(job: JobInfo) -> Spot:
        """A running job's node, its agent reached by srun inside the job."""
        label = f"{job.node} (Slurm job {job.job_id})"
        return Spot(label, "jobrelay", in_job(job.job_id), network=True)

    async def place(self, conn: Connection, renew: bool) -> Spot:
        if self.request.job is not None:
            return await self._place_in_allocation(conn, self.request.job, renew)
        if self.job is None and not renew:  # attach from another process: find its job
            self.job = await job_named(conn, JOB_PREFIX + self.kernel_id)
            if self.job is None or not self.job.running:
                self.job = None
                raise KernelGone(f"no running Slurm job holds kernel {self.kernel_id}")
        if self.job is not None:
            info = await job_info(conn, self.job.job_id)
            if info is not None and info.running:
                return self.spot_of(self.job)
            self._gone(conn, renew)
            self._report_end(await final_info(conn, self.job.job_id, CANCEL_WAIT))
        self.job = await self._submit(conn)
        self._warnings = asyncio.ensure_future(self._warn_before_limit(self.job))
        return self.spot_of(self.job)

    async def _place_in_allocation(self, conn: Connection, job_id: int, renew: bool) -> Spot:
        """The user's own allocation (salloc): it must run; the agent's daemon is started as
        a step of it (a second start ends at once: one daemon per job)."""
        info = await job_info(conn, job_id)
        if info is None or not info.running:
            if self.job is not None:  # it ran this kernel, and has ended since
                self._gone(conn, renew)
                self._report_end(await final_info(conn, job_id, CANCEL_WAIT))
            state = info.state if info is not None else "unknown to Slurm"
            raise LaunchError(
                f"Slurm job {job_id} is not running ({state}); set slurm.job to a running "
                f"allocation of yours (`squeue --me` lists them), or leave it out to submit one"
            )
        if self.job is None:
            self._warnings = asyncio.ensure_future(self._warn_before_limit(info))
        self.job = info
        await start_step_daemon(conn, job_id, self.settings.python)
        return self.spot_of(info)

    def _gone(self, conn: Connection, renew: bool) -> None:
        """The job ended under its kernel: on a reconnect (not ``renew``), say so at once,
        while Slurm's own reason (known once the job has stopped COMPLETING) is logged as
        soon as it is known."""
        if renew:
            return
        assert self.job is not None
        self._explaining = asyncio.ensure_future(self.ended(conn))
        raise KernelGone(f"Slurm job {self.job.job_id} has ended")

    async def _submit(self, conn: Connection) -> JobInfo:
        """Submit the kernel's job and wait (queue_timeout) until it runs; cancel it if
        that fails or the caller gives up."""
        started = time.monotonic()
        args = [f"--job-name={JOB_PREFIX}{self.kernel_id}", "--nodes=1", "--ntasks=1",
                *self.request.sbatch_args()]  # fmt: skip
        job_id = await sbatch(conn, args, self.batch_script())
        self._ended = ""
        try:
            info = await self._wait_running(conn, job_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._cancel(conn, job_id))
            raise
        self.log.info("Slurm job %d of kernel %s runs on %s (%.1f s after submission, time "
                      "limit %s)", job_id, self.kernel_id, info.node, time.monotonic() - started,
                      info.time_limit)  # fmt: skip
        return info

    def batch_script(self) -> bytes:
        """The job's script: the remote agent's daemon, fed its bundle on stdin."""
        command = remote_command(self.settings.python, "jobdaemon")
        head = f"#!/bin/sh\n# jupyter-remote-provisioner: kernel {self.kernel_id}\n"
        return f"{head}{command} <<'JRP_AGENT_BUNDLE'\n".encode() + (
            bootstrap_input() + b"\nJRP_AGENT_BUNDLE\n"
        )

    async def _wait_running(self, conn: Connection, job_id: int) -> JobInfo:
        deadline = time.monotonic() + self.request.queue_timeout
        pause, said, fast_until = POLL_FAST, "", time.monotonic() + POLL_FAST_FOR
        while True:
            info = await job_info(conn, job_id)
            if info is not None and info.running:
                return info
            if info is None or not info.active:
                raise await self._ended_early(conn, job_id, info)
            if info.reason in NEVER:
                raise LaunchError(
                    f"Slurm job {job_id} cannot start as asked (reason: {info.reason}: "
                    f"{NEVER[info.reason]}) and was cancelled; change the request "
                    f"(`remote_kernel check` asks the cluster whether it accepts it)"
                )
            news = f"{info.state} ({info.reason})"
            if news != said:
                self.log.info("Kernel %s: queued as Slurm job %d (%s, reason: %s)",
                              self.kernel_id, job_id, info.state, info.reason)  # fmt: skip
                said = news
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(
                    f"Slurm job {job_id} was still waiting after {self.request.queue_timeout:g} "
                    f"s (reason: {info.reason}) and was cancelled; raise slurm.queue_timeout, "
                    f"or ask for fewer resources or another partition"
                )
            await asyncio.sleep(min(pause, remaining))
            if time.monotonic() > fast_until:
                pause = min(2 * pause, POLL_MAX)

    async def _ended_early(
        self, conn: Connection, job_id: int, info: JobInfo | None
    ) -> LaunchError:
        """The job ended before its kernel started: how, and the end of its output."""
        tail = await output_tail(conn, job_id)
        what = info.ending() if info else f"Slurm job {job_id} vanished"
        return LaunchError(f"{what} before the kernel started"
                           + (f"; its output: {tail}" if tail else ""))  # fmt: skip

    async def explain(self, conn: Connection, error: RemoteKernelError) -> RemoteKernelError:
        if self.job is None:
            return error
        job_id = self.job.job_id
        info = await final_info(conn, job_id, CANCEL_WAIT)
        if info is not None and info.active:
            return error
        return await self._ended_early(conn, job_id, info)

    async def _warn_before_limit(self, job: JobInfo) -> None:
        """Warn in the log ahead of the time limit, when the kernel ends with the job."""
        left = job.seconds_left()
        if left is None:
            return
        end = time.monotonic() + left
        for before in WARN_BEFORE:
            if before >= left:
                continue
            await asyncio.sleep(max(0.0, end - before - time.monotonic()))
            self.log.warning(
                "Slurm job %d of kernel %s reaches its time limit (%s) in %s; the kernel ends "
                "then: save your work", job.job_id, self.kernel_id, job.time_limit,
                _minutes(before),
            )  # fmt: skip

    def _report_end(self, info: JobInfo | None) -> str:
        """Log once why the job ended; the reason."""
        assert self.job is not None
        reason = info.ending() if info is not None else (
            f"Slurm job {self.job.job_id} is no longer known to Slurm"
        )  # fmt: skip
        if reason != self._ended:
            self.log.warning("Remote kernel %s ended with its job: %s", self.kernel_id, reason)
            self._ended = reason
        if self._warnings is not None:
            self._warnings.cancel()
        return reason

    async def ended(self, conn: Connection) -> str | None:
        if self.job is None:
            return None
        info = await job_info(conn, self.job.job_id)
        if info is not None and info.running:
            return None
        return self._report_end(await final_info(conn, self.job.job_id, CANCEL_WAIT))

    async def release(self, conn: Connection) -> None:
        if self._warnings is not None:
            self._warnings.cancel()
        job, self.job = self.job, None
        if job is not None and self.request.job is None:  # the user's allocation stays
            await self._cancel(conn, job.job_id)

    async def _cancel(self, conn: Connection, job_id: int) -> None:
        """scancel the job, wait (bounded) until it has left the queue, remove its output."""
        info = await job_info(conn, job_id)
        if info is not None and info.active:
            await scancel(conn, job_id)
            deadline = time.monotonic() + CANCEL_WAIT
            while info is not None and info.active and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                info = await job_info(conn, job_id)
            self.log.info("Cancelled Slurm job %d of kernel %s", job_id, self.kernel_id)
        await remove_output(conn, job_id)

    async def stop_kernel(self, conn: Connection, kernel_id: str) -> str:
        if self.request.job is not None:  # in the user's allocation: stop the kernel alone
            spot = await self.place(conn, renew=False)
            return await stop_through_agent(conn, self.settings, spot, kernel_id)
        if self.job is None:
            self.job = await job_named(conn, JOB_PREFIX + kernel_id)
            if self.job is None:
                raise KernelGone(f"no Slurm job holds kernel {kernel_id}")
        job_id = self.job.job_id
        await self.release(conn)
        return f"its Slurm job {job_id} was cancelled"


async def job_kernels(conn: Connection, settings: KernelSettings) -> list[dict[str, Any]]:
    """The kernels in the user's kernel jobs, as their agents list them, with each one's
    job, node, state and time left (a pending job: its kernel id and reason only)."""
    found: list[dict[str, Any]] = []
    jobs = await our_jobs(conn, JOB_PREFIX)
    allocation = settings.slurm.job if settings.slurm is not None else None
    if allocation is not None and allocation not in {job.job_id for job in jobs}:
        info = await job_info(conn, allocation)
        jobs += [info] if info is not None and info.running else []
    for job in jobs:
        where = {"job": job.job_id, "node": job.node, "job_state": job.state,
                 "time_left": job.seconds_left(), "reason": job.reason}  # fmt: skip
        if not job.running:
            found.append({"kernel": job.name[len(JOB_PREFIX) :], "pending": True, **where})
            continue
        spot = SlurmSite.spot_of(job)
        assert conn.ssh is not None
        agent = await RemoteAgent.start(
            conn.ssh, settings.python, spot.label, settings.connect_timeout, 0,
            spot.agent_mode, spot.launcher,
        )  # fmt: skip
        try:
            reply = await agent.request("list", reply_timeout=settings.connect_timeout)
        finally:
            await agent.close()
        found.extend(dict(k, **where) for k in reply.get("kernels", []))
    return found


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
