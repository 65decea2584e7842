"""The Slurm cluster fixture itself: what the Slurm kernel tests rely on, seen through the
login node's sshd from the test process, as the provisioner sees it."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh
import pytest

from netns import ip
from slurm_cluster import SlurmCluster, destroy_stale_clusters
from slurm_files import FREEZER, NODE_CPUS
from sshd import wait_until

LISTENER_PORT = 47011
LISTENER = f"""\
import socket
name = socket.gethostname()
with socket.create_server((socket.gethostbyname(name), {LISTENER_PORT})) as server:
    conn, _ = server.accept()
    conn.sendall(f"hello from {{name}}\\n".encode())
"""


def ssh(slurm: SlurmCluster, command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``command`` on the login node over ssh (bounded), output as text."""
    return subprocess.run(slurm.ssh_argv(command), input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def submit(slurm: SlurmCluster, args: str) -> str:
    """``sbatch ARGS`` over ssh, output in ``job_dir``; the job id."""
    res = ssh(slurm, f"sbatch --parsable -o {slurm.job_dir}/%j.out {args}")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def timed(what: str, since: float) -> None:
    """Print a duration (shown with ``pytest -s``: the fixture's timings)."""
    print(f"\n[timing] {what}: {time.monotonic() - since:.2f} s")


def test_only_the_login_node_is_reachable(slurm: SlurmCluster) -> None:
    with socket.create_connection((slurm.login_addr, 22), timeout=5):
        pass
    for addr in slurm.node_addrs.values():
        with pytest.raises(OSError, match="No route to host"):
            socket.create_connection((addr, 6818), timeout=5)  # slurmd's port
    probe = (
        "import socket,sys; [socket.create_connection((a, 6818), 5).close() for a in sys.argv[1:]]"
    )
    res = slurm.run_on_login([sys.executable, "-c", probe, *slurm.node_addrs.values()])
    assert res.returncode == 0, res.stderr


def test_sbatch_over_ssh_runs_on_a_node(slurm: SlurmCluster) -> None:
    start = time.monotonic()
    jobid = submit(slurm, "--wrap 'hostname; sleep 30'")
    node = slurm.wait_running([jobid])[jobid]
    timed("sbatch over ssh until RUNNING (idle nodes)", start)
    assert node in slurm.nodes
    assert [(j["id"], j["state"], j["node"]) for j in slurm.squeue()] == [(jobid, "RUNNING", node)]
    out = slurm.job_dir / f"{jobid}.out"
    assert wait_until(lambda: out.exists() and out.read_text() == f"{node}\n", 10), slurm.logs()


def test_jobs_taking_a_whole_node_land_on_both_nodes(slurm: SlurmCluster) -> None:
    jobs = [submit(slurm, f"-c {NODE_CPUS} --wrap 'sleep 60'") for _ in slurm.nodes]
    assert sorted(slurm.wait_running(jobs).values()) == sorted(slurm.nodes)


async def _read_through_login(slurm: SlurmCluster, addr: str, port: int) -> bytes:
    """Connect to addr:port through an SSH direct-tcpip forward via the login node."""
    async with asyncssh.connect(slurm.login_addr, username=slurm.user, known_hosts=str(slurm.known_hosts),
                                client_keys=[str(slurm.identity_file)]) as conn:  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # bounded polling until the job's listener is up
            try:
                reader, writer = await conn.open_connection(addr, port)
                break
            except asyncssh.ChannelOpenError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return line


def test_job_listener_is_reachable_only_through_the_login_node(slurm: SlurmCluster) -> None:
    script = slurm.job_dir / "listener.py"
    script.write_text(LISTENER)
    jobid = submit(slurm, f"--wrap 'exec {sys.executable} {script}'")
    node = slurm.wait_running([jobid])[jobid]
    addr = slurm.node_addrs[node]
    with pytest.raises(OSError, match="No route to host"):
        socket.create_connection((addr, LISTENER_PORT), timeout=5)
    line = asyncio.run(_read_through_login(slurm, addr, LISTENER_PORT))
    assert line == f"hello from {node}\n".encode()


def test_srun_overlap_runs_in_the_job_and_carries_stdio(
    slurm: SlurmCluster, remote_tmp: Path
) -> None:
    jobid = submit(slurm, "--wrap 'sleep 300'")
    node = slurm.wait_running([jobid])[jobid]
    step = 'echo "$SLURM_JOB_ID $(hostname) $SLURM_LAUNCH_NODE_IPADDR $TMPDIR"; cat'
    start = time.monotonic()
    res = ssh(slurm, f"srun --jobid={jobid} --overlap -N1 -n1 sh -c '{step}'", stdin="ping\n")
    timed("ssh + srun --overlap round trip", start)
    assert res.returncode == 0, res.stderr + slurm.logs()
    # TMPDIR is the ssh session's (remote_session_env): srun passes its environment on
    assert res.stdout == f"{jobid} {node} {slurm.inner_addr} {remote_tmp}\nping\n"
    start = time.monotonic()
    res = slurm.run_on_login(["srun", f"--jobid={jobid}", "--overlap", "-N1", "-n1", "true"])
    timed("srun --overlap alone, on the login node", start)
    assert res.returncode == 0, res.stderr


def test_a_process_a_step_leaves_behind_dies_with_the_step(slurm: SlurmCluster) -> None:
    """proctrack/cgroup, as on real clusters: setsid does not take a process out of its step."""
    assert FREEZER.is_dir(), (
        "this machine has no cgroup v1 freezer: the fixture fell back to linuxproc"
    )
    jobid = submit(slurm, "--wrap 'sleep 300'")
    node = slurm.wait_running([jobid])[jobid]
    step = "setsid -f sleep 4321 </dev/null >/dev/null 2>&1; echo started"
    res = ssh(slurm, f"srun --jobid={jobid} --overlap -N1 -n1 sh -c '{step}'")
    assert res.stdout == "started\n", res.stderr
    assert wait_until(lambda: "sleep 4321" not in slurm.node_processes(node).values(), 10)
    assert "sleep 300" in slurm.node_processes(node).values(), "the batch step lives on"


def test_gpus_give_cuda_visible_devices(slurm: SlurmCluster) -> None:
    jobid = submit(slurm, "-p gpu --gpus=1 --wrap 'echo $CUDA_VISIBLE_DEVICES; sleep 300'")
    slurm.wait_running([jobid])
    out = slurm.job_dir / f"{jobid}.out"
    assert wait_until(lambda: out.exists() and out.read_text() == "0\n", 10)
    res = ssh(slurm, f"srun --jobid={jobid} --overlap -N1 -n1 printenv CUDA_VISIBLE_DEVICES")
    assert res.stdout == "0\n", res.stderr
    res = ssh(slurm, "srun -p gpu --gpus=2 printenv CUDA_VISIBLE_DEVICES")
    assert res.stdout == "0,1\n", res.stderr


def test_scancel_removes_the_job(slurm: SlurmCluster) -> None:
    jobid = submit(slurm, "--wrap 'sleep 300'")
    slurm.wait_running([jobid])
    start = time.monotonic()
    assert ssh(slurm, f"scancel {jobid}").returncode == 0
    assert wait_until(lambda: not slurm.squeue(), 10), slurm.squeue()
    timed("scancel over ssh until squeue is empty", start)
    assert slurm.job_state(jobid)["JobState"] == "CANCELLED"
    start = time.monotonic()
    slurm.wait_idle()
    timed("then until both nodes are idle", start)


def test_a_job_queues_behind_a_full_cluster(slurm: SlurmCluster) -> None:
    holders = slurm.fill_cluster()
    jobid = submit(slurm, "--wrap 'sleep 300'")
    assert wait_until(lambda: slurm.job_state(jobid).get("Reason") == "Resources", 10)
    assert slurm.job_state(jobid)["JobState"] == "PENDING"
    assert ssh(slurm, f"scancel {holders[0]}").returncode == 0
    assert slurm.wait_running([jobid], timeout=30)[jobid] == slurm.job_state(holders[0])["NodeList"]


def test_cut_login_drops_the_link_and_restore_brings_it_back(slurm: SlurmCluster) -> None:
    slurm.cut_login()
    with pytest.raises(TimeoutError):
        socket.create_connection((slurm.login_addr, 22), timeout=1)
    slurm.restore_login()
    assert ssh(slurm, "hostname").stdout == "login\n"


def test_a_crashed_runs_cluster_is_removed_by_the_next(tmp_path: Path) -> None:
    code = ("import sys; sys.path.insert(0, 'tests'); from slurm_cluster import SlurmCluster; "
            "c = SlurmCluster().create(); print(c.dir, flush=True); sys.stdin.read()")  # fmt: skip
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None
    workdir = child.stdout.readline().strip()
    timed("cluster start (another process)", start)
    prefix = f"jrs{child.pid}"
    assert Path(workdir).name.startswith(prefix)
    nodes = re.findall(r"^NodeName=(\S+)", Path(workdir, "slurm.conf").read_text(), re.MULTILINE)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    start = time.monotonic()
    destroy_stale_clusters()
    timed("destroy (a crashed run's cluster)", start)
    assert prefix not in ip("netns", "list").stdout
    assert prefix not in ip("-o", "link", "show").stdout
    assert not list(Path(tempfile.gettempdir()).glob(f"{prefix}-*"))
    assert not [c for n in nodes for c in FREEZER.parent.glob(f"*/slurm_{n}")]
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and workdir in _about(p)]


def _about(proc: Path) -> str:
    """A process's command line and environment (slurmd's SLURM_CONF names the directory)."""
    try:
        return ((proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()).decode(
            errors="replace"
        )
    except OSError:
        return ""
