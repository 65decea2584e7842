"""The files a test Slurm cluster runs from (tests/slurm_cluster.py), in one directory.

slurm.conf (read by every daemon and command through ``SLURM_CONF``), gres.conf with fake GPUs,
cgroup.conf, the munge key, and the hosts file every host bind-mounts on /etc/hosts.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sshd import wait_until

NODE_CPUS = 2
NODE_GPUS = 2  # fake: character devices of ours, enough for CUDA_VISIBLE_DEVICES
PARTITIONS = ("debug", "gpu")  # debug is the default; both hold both nodes
FREEZER = Path("/sys/fs/cgroup/freezer")  # cgroup v1: proctrack/cgroup; else proctrack/linuxproc

SLURM_CONF = """\
ClusterName=jrp
SlurmctldHost=login({login})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/run/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/{proctrack}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
GresTypes=gpu
"""


def write_files(d: Path, login_addr: str, node_addrs: dict[str, str]) -> None:
    """Write everything but ssh's files into ``d``, for slurmctld on ``login_addr``."""
    nodes = list(node_addrs)
    for sub in ("state", "log", "run", "munge", "client", "jobs", *(f"spool/{n}" for n in nodes)):
        (d / sub).mkdir(parents=True)
    d.chmod(0o711)
    (d / "munge").chmod(0o700)  # munged refuses a key others can read
    (d / "run").chmod(0o711)  # others reach the munge socket through it
    (d / "munge" / "munge.key").write_bytes(os.urandom(1024))
    (d / "munge" / "munge.key").chmod(0o600)
    gres = ["AutoDetect=off"]
    for node in nodes:  # slurmd wants character devices: ours are /dev/null's (1, 3)
        (d / "dev" / node).mkdir(parents=True)
        for i in range(NODE_GPUS):
            os.mknod(d / "dev" / node / f"nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        gres.append(f"NodeName={node} Name=gpu File={d}/dev/{node}/nvidia[0-{NODE_GPUS - 1}]")
    (d / "gres.conf").write_text("\n".join(gres) + "\n")
    hosts = ["127.0.0.1 localhost", f"{login_addr} login"]
    (d / "hosts").write_text("\n".join(hosts + [f"{a} {n}" for n, a in node_addrs.items()]) + "\n")
    proctrack = "cgroup" if FREEZER.is_dir() else "linuxproc"
    if proctrack == "cgroup":
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
    conf = [SLURM_CONF.format(d=d, login=login_addr, proctrack=proctrack)]
    conf += [
        f"NodeName={n} NodeAddr={a} CPUs={NODE_CPUS} RealMemory=1000 Gres=gpu:{NODE_GPUS}\n"
        for n, a in node_addrs.items()
    ]
    conf += [
        f"PartitionName={p} Nodes={','.join(nodes)} Default={'YES' if p == PARTITIONS[0] else 'NO'}"
        " MaxTime=INFINITE State=UP\n"
        for p in PARTITIONS
    ]
    (d / "slurm.conf").write_text("".join(conf))


def remove_cgroups(node: str) -> None:
    """Remove the cgroups slurmd made for ``node`` (empty once its processes are gone)."""
    for top in FREEZER.parent.glob(f"*/slurm_{node}"):
        for d, _, _ in os.walk(top, topdown=False):
            if not wait_until(lambda d=d: _rmdir(d), timeout=5):  # type: ignore[misc]
                raise RuntimeError(f"cgroup {d} cannot be removed")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False  # EBUSY: a process (a zombie) is still in it
    return True
