"""Inside a Slurm job: the job's batch script is the daemon, and relays reach it with srun.

A job's daemon (mode "jobdaemon") owns the kernels of that one job. It lives in a private
root of its own, <tmp>/jupyter-remote-<uid>-slurm<job id>, so it never meets the daemon of
another job or of plain SSH kernels on the same node; a relay started inside the job (mode
"jobrelay", by ``srun --jobid=J --overlap``) finds it there and never starts one. Kernels get
the batch step's environment (the allocation's CUDA_VISIBLE_DEVICES and SLURM_* variables)
and listen on the node's address toward the login node, where their forwards come from.
The daemon exits once it has neither kernels nor clients, and with it the job ends.

A client that lost its connection leaves forwards behind in its old sshd session on the login
node, which a kernel's sockets would take for the client still there; the daemon cannot end
that session (it runs on another machine), so it tells the reconnected client its pid.
"""

import contextlib
import os
import shutil
import socket

from .common import AgentError, base_root, ensure_base_dir

SESSION_PID = "JRP_SESSION_PID"  # a relay's sshd session on the login node (set by the client)
FIRST_CLIENT_GRACE = 60.0  # seconds a job's daemon waits for the relay of its submitter


def job_id():
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise AgentError("not inside a Slurm job (SLURM_JOB_ID is not set)")
    return job


def job_root():
    """The private root of this job's daemon (created if missing)."""
    return ensure_base_dir(base_root(), "-slurm" + job_id())


def remove_job_files():
    """The daemon is leaving: nothing of the job stays, neither in the node's temp dir nor
    its output file (our sbatch names it .../jupyter-remote-provisioner/slurm-<id>.out; the
    client reads it only when the job fails before its daemon runs)."""
    shutil.rmtree(os.path.join(base_root(), f"jupyter-remote-{os.getuid()}-slurm{job_id()}"),
                  ignore_errors=True)  # fmt: skip
    try:
        output = os.readlink("/proc/self/fd/1")
    except OSError:
        return
    head, name = os.path.split(output)
    if name == f"slurm-{job_id()}.out" and os.path.basename(head) == "jupyter-remote-provisioner":
        with contextlib.suppress(OSError):
            os.unlink(output)


def address_toward(peer):
    """This node's address on the route to ``peer`` (the login node, as srun reports it in
    SLURM_LAUNCH_NODE_IPADDR): where the login node's sshd reaches a kernel's ports."""
    if not peer:
        raise AgentError("cannot tell this node's address toward the login node "
                         "(srun set no SLURM_LAUNCH_NODE_IPADDR)")  # fmt: skip
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect((peer, 9))  # no packet is sent: this only picks the route
        return probe.getsockname()[0]
    except OSError as e:
        raise AgentError(f"no route from this node to the login node {peer}: {e.strerror}")
    finally:
        probe.close()
