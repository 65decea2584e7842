"""Kernels on a real Slurm cluster: a login node and two compute nodes in network namespaces,
where only the login node is reachable from here (see slurm_cluster.py)."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from drivers import Driver
from kernel_fixtures import CURVE_DECLARED, PYTHON
from kernels import interrupt_sleeping_cell, rk, run_cell, wait_for, write_spec
from notebooks import code, read_notebook, script, stdout_of, write_notebook
from slurm_cluster import SlurmCluster
from sshd import SshServer

pytestmark = pytest.mark.timeout(180)

WHERE = (
    "import os, socket; print(os.environ['SLURM_JOB_ID'], socket.gethostname(), "
    "os.environ.get('CUDA_VISIBLE_DEVICES'), os.getpid())"
)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """What the package logs (INFO and up) while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("traitlets")  # the provisioner logs through its parent's log
    for name in ("traitlets", "jupyter_remote_provisioner"):
        logging.getLogger(name).addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.setLevel(old)
    for name in ("traitlets", "jupyter_remote_provisioner"):
        logging.getLogger(name).removeHandler(handler)


def logged(lines: list[str], pattern: str) -> bool:
    return any(re.search(pattern, line) for line in lines)


def reported_dead(driver: Driver, log_lines: list[str], reason: str, within: float) -> None:
    """The kernel is reported dead within ``within`` s, and the log says ``reason``."""
    wait_for(lambda: not driver.is_alive(), within, "the kernel to be reported dead")
    wait_for(lambda: logged(log_lines, f"ended with its job: {reason}"), 10, "the reason")


def our_jobs(slurm: SlurmCluster) -> list[dict[str, str]]:
    return [job for job in slurm.squeue() if job["name"].startswith("jrp-")]


def test_start_interrupt_restart_shutdown(slurm, slurm_spec, log_lines):
    driver = Driver("async", slurm_spec(slurm={"gpus": 1, "time": "10:00"}))
    try:
        driver.start()
        (job,) = our_jobs(slurm)
        assert job["state"] == "RUNNING" and job["node"] in slurm.nodes
        assert logged(log_lines, rf"Slurm job {job['id']} of kernel \S+ runs on {job['node']}")
        kc = driver.client()
        out, reply = run_cell(kc, WHERE)
        job_id, hostname, gpus, pid = out.split()
        assert (job_id, hostname, gpus) == (job["id"], job["node"], "0"), "in the job, its GPU"
        run_cell(kc, "x = 42")
        reply = interrupt_sleeping_cell(kc, driver.interrupt)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert run_cell(kc, "print(x)")[0].strip() == "42"
        driver.restart()
        kc = driver.client()
        out, _ = run_cell(kc, WHERE)
        assert out.split()[:2] == [job["id"], job["node"]], "restarted in the same job"
        assert out.split()[3] != pid, "a new kernel process"
        assert run_cell(kc, "print('x' in dir())")[0].strip() == "False"
        driver.shutdown()
        assert our_jobs(slurm) == [], "the job ends with the kernel"
    finally:
        driver.close()


def test_two_kernels_on_two_nodes(slurm, slurm_spec):
    drivers = [Driver("async", slurm_spec(slurm={"cpus": 2})) for _ in range(2)]
    try:
        for driver in drivers:
            driver.start()
        hosts = {run_cell(d.client(), WHERE)[0].split()[1] for d in drivers}
        assert hosts == set(slurm.nodes)
    finally:
        for driver in drivers:
            driver.close()
    assert our_jobs(slurm) == []


def test_queued_until_the_cluster_frees_up(slurm, slurm_spec, log_lines):
    holders = slurm.fill_cluster()
    driver = Driver("async", slurm_spec(slurm={"cpus": 1}))
    started = threading.Thread(target=driver.start, daemon=True)
    try:
        started.start()
        wait_for(lambda: logged(log_lines, r"queued as Slurm job \d+ \(PENDING, reason: Resources"),
                 15, "the kernel's job to queue")  # fmt: skip
        assert started.is_alive(), "the start waits while the job is pending"
        slurm.run_on_login(["scancel", *holders])
        started.join(60)
        assert not started.is_alive()
        assert run_cell(driver.client(), "print(6 * 7)")[0].strip() == "42"
    finally:
        driver.close()
    assert our_jobs(slurm) == []


def test_queue_timeout_cancels_the_job(slurm, slurm_spec):
    slurm.fill_cluster()
    name = slurm_spec(slurm={"cpus": 1, "queue_timeout": 2})
    driver = Driver("async", name)
    began = time.monotonic()
    with pytest.raises(Exception) as failure:
        driver.start()
    took = time.monotonic() - began
    message = str(failure.value)
    assert re.fullmatch(r"Slurm job \d+ was still waiting after 2 s \(reason: Resources\) and "
                        r"was cancelled; raise slurm.queue_timeout, or ask for fewer resources "
                        r"or another partition", message), message  # fmt: skip
    assert 2 <= took < 2 + 5
    assert our_jobs(slurm) == [], "the waiting job is cancelled"
    driver.close()


def test_job_cancelled_from_outside(slurm, slurm_spec, log_lines):
    driver = Driver("async", slurm_spec())
    try:
        driver.start()
        (job,) = our_jobs(slurm)
        slurm.run_on_login(["scancel", job["id"]])
        reported_dead(driver, log_lines, rf"Slurm job {job['id']} was cancelled", 20)
    finally:
        driver.close()
    assert our_jobs(slurm) == []


def test_time_limit_warns_then_ends_the_kernel(slurm, slurm_spec, log_lines):
    """Slurm's smallest time limit is a minute: this test takes about 70 s."""
    driver = Driver("async", slurm_spec(slurm={"time": "1"}))
    try:
        driver.start()
        (job,) = our_jobs(slurm)
        wait_for(lambda: logged(log_lines, rf"Slurm job {job['id']} of kernel \S+ reaches its "
                                r"time limit \(00:01:00\) in 20 s"), 60, "the warning")  # fmt: skip
        assert driver.is_alive(), "warned ahead of the end"
        reported_dead(driver, log_lines, rf"Slurm job {job['id']} reached its time limit "
                      r"\(00:01:00\)", 60)  # fmt: skip
    finally:
        driver.close()
    assert our_jobs(slurm) == []


def test_reconnects_after_a_link_cut(slurm, slurm_spec):
    driver = Driver("async", slurm_spec(keepalive_interval=1))
    try:
        driver.start()
        (job,) = our_jobs(slurm)
        kc = driver.client()
        run_cell(kc, "x = 7")
        slurm.cut_login()
        try:
            wait_for(lambda: driver.provisioner._kernel._recovery is not None, 15,
                     "the client to notice the cut")  # fmt: skip
        finally:
            slurm.restore_login()
        wait_for(lambda: driver.provisioner._kernel._recovery is None, 30, "the reconnect")
        kc.wait_for_ready(timeout=30)  # as a client re-syncs (JupyterLab sends kernel_info)
        assert run_cell(kc, "print(x)")[0].strip() == "7"
        assert [j["id"] for j in our_jobs(slurm)] == [job["id"]], "the job kept running"
    finally:
        driver.close()
    assert our_jobs(slurm) == []


def test_vscode_launcher_and_orphaned_job(slurm, slurm_spec, kernels_dir):
    """VS Code's way (its own plain connection file, SIGINT to interrupt) reaches a kernel
    that encrypts; then the launcher dies (kill -9): the kernel is reaped after
    orphan_timeout, and its job ends with it."""
    name = slurm_spec(orphan_timeout=1)
    spec_dir = kernels_dir / name
    launcher = subprocess.Popen(
        ["jupyter-remote-kernel", "launch", "--kernelspec", str(spec_dir), "-f",
         str(_connection_file(spec_dir))],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    kc = BlockingKernelClient()
    try:
        kc.load_connection_file(str(spec_dir / "connection.json"))
        kc.start_channels(hb=False)
        kc.wait_for_ready(timeout=60)  # as VS Code does, while the launcher starts the kernel
        assert run_cell(kc, WHERE)[0].split()[0] == our_jobs(slurm)[0]["id"]
        out: list[str] = []
        kc.execute_interactive(
            "print('hello', input('name? '))", timeout=30, allow_stdin=True,
            stdin_hook=lambda msg: kc.input("slurm"),
            output_hook=lambda msg: out.append(msg["content"].get("text", "")),
        )  # fmt: skip
        assert "hello slurm" in "".join(out), "stdin reaches the client through the bridge"
        reply = interrupt_sleeping_cell(kc, lambda: launcher.send_signal(signal.SIGINT))
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()
        launcher.kill()
        launcher.wait(10)
    wait_for(lambda: our_jobs(slurm) == [], 30, "the job to end with the reaped kernel")


def test_ps_shows_job_node_and_time_left(slurm, slurm_spec):
    name = slurm_spec(slurm={"time": "30:00"})
    driver = Driver("async", name)
    try:
        driver.start()
        (job,) = our_jobs(slurm)
        res = rk("ps", name)
        assert res.returncode == 0, res.stderr
        kernel_id = driver.provisioner._kernel.kernel_id
        (row,) = [line for line in res.stdout.splitlines() if line.startswith(kernel_id[:8])]
        assert f"{job['node']} (job {job['id']})" in row
        assert re.search(r"\b(29m\d\ds|30m00s)$", row), row
        stopped = rk("stop", kernel_id[:8], "--name", name)
        assert stopped.returncode == 0, stopped.stderr
        assert f"its Slurm job {job['id']} was cancelled" in stopped.stdout
        assert our_jobs(slurm) == []
    finally:
        driver.close()


@pytest.mark.parametrize(
    ("slurm_request", "python", "expected"),
    [
        (
            {"partition": "nope"},
            PYTHON,
            r"Slurm on login \S* refused sbatch .*: Invalid partition name specified",
        ),
        (
            {"gpus": 5},
            PYTHON,
            r"Slurm on login \S* refused sbatch .*: Requested node configuration is not available",
        ),
        (
            {"cpus": 64},
            PYTHON,
            (
                r"Slurm job \d+ cannot start as asked \(reason: PartitionConfig: more than the "
                r"partition's nodes or limits allow\) and was cancelled; change the request "
                r"\(`remote_kernel check` asks the cluster whether it accepts it\)"
            ),
        ),
        (
            {},
            "/nonexistent/python3",
            (
                r"Slurm job \d+ failed \(exit code 127:0\) before the kernel started; its "
                r"output: .*/nonexistent/python3.*not found"
            ),
        ),
    ],
    ids=["unknown-partition", "never-satisfiable", "beyond-partition", "job-fails-first"],
)
def test_start_errors(slurm, slurm_spec, slurm_request, python, expected, remote_session_env):
    driver = Driver("async", slurm_spec(slurm=slurm_request, python=python))
    began = time.monotonic()
    with pytest.raises(Exception) as failure:
        driver.start()
    message = str(failure.value)
    assert "\n" not in message and re.fullmatch(expected, message), message
    assert time.monotonic() - began < 15, "at once, not after a timeout"
    assert our_jobs(slurm) == []
    outputs = Path(remote_session_env["HOME"], ".cache", "jupyter-remote-provisioner")
    assert not list(outputs.glob("slurm-*.out")), "the job's output is removed once read"
    driver.close()


def _connection_file(spec_dir: Path) -> Path:
    """A connection file as VS Code writes one: free local ports, a fresh key."""
    from jupyter_client.connect import write_connection_file

    path, _ = write_connection_file(str(spec_dir / "connection.json"))
    return Path(path)


def test_kernel_in_an_allocation_of_ones_own(slurm, slurm_spec):
    """`job`: the user's own allocation (as from salloc) runs the kernel as a step; a restart
    stays in it, and a shutdown leaves the allocation running."""
    (allocation,) = [slurm.sbatch("-J", "mine", "-o", "/dev/null", "--wrap", "exec sleep 300")]
    slurm.wait_running([allocation])
    # connection_persist 0: the agent's channel closes with the kernel (else kept for 300 s)
    driver = Driver("async", slurm_spec(slurm={"job": int(allocation)}, connection_persist=0))
    try:
        driver.start()
        assert [j["name"] for j in slurm.squeue()] == ["mine"], "no job submitted"
        kc = driver.client()
        assert run_cell(kc, WHERE)[0].split()[0] == allocation
        driver.restart()
        assert run_cell(driver.client(), WHERE)[0].split()[0] == allocation
        driver.shutdown()
        assert slurm.job_state(allocation)["JobState"] == "RUNNING", "the allocation stays"
        wait_for(lambda: _steps(slurm, allocation) == [], 15, "the agent's step to end")
    finally:
        driver.close()


def test_allocation_that_is_not_running(slurm, slurm_spec):
    driver = Driver("async", slurm_spec(slurm={"job": 999999}))
    with pytest.raises(Exception) as failure:
        driver.start()
    assert str(failure.value) == (
        "Slurm job 999999 is not running (unknown to Slurm); set slurm.job to a running "
        "allocation of yours (`squeue --me` lists them), or leave it out to submit one"
    )
    driver.close()


def _steps(slurm: SlurmCluster, job: str) -> list[str]:
    """The job's steps other than its batch script."""
    out = slurm.run_on_login(["squeue", "--steps", "--noheader", "--format=%i", "-j", job])
    return [s for s in out.stdout.split() if not s.endswith((".batch", ".extern"))]


def test_check_asks_the_cluster(slurm, slurm_spec):
    good = rk("check", slurm_spec(slurm={"partition": "gpu", "gpus": 1}), check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"\[ok\] +Slurm accepts the request \(sbatch --partition=gpu --gpus=1\): "
                     r"Job \d+ to start at \S+ using 1 processors on nodes n\d in partition gpu",
                     good.stdout), good.stdout  # fmt: skip
    assert "encrypted with CurveZMQ; other users of the cluster cannot read it" in good.stdout
    bad = rk("check", slurm_spec(slurm={"partition": "nope"}), check=False)
    assert bad.returncode == 1
    assert re.search(r"\[FAIL\] +Slurm on login .* refused the request: invalid partition "
                     r"specified: nope$", bad.stdout, re.MULTILINE), bad.stdout  # fmt: skip
    assert our_jobs(slurm) == [] and slurm.squeue() == [], "check submits nothing"


def test_upload_reaches_the_node(slurm, slurm_spec, tmp_path):
    """`upload` copies to the login node, whose file system the nodes share."""
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    work = tmp_path / "remote-work"
    work.mkdir()
    driver = Driver("async", slurm_spec(upload=["data.csv"], cwd=str(work)))
    try:
        driver.start(cwd=str(tmp_path))
        out, _ = run_cell(driver.client(), "import socket; print(socket.gethostname(), "
                                           "open('data.csv').read().split()[1])")  # fmt: skip
        assert out.split() == [our_jobs(slurm)[0]["node"], "1,2"]
    finally:
        driver.close()


def test_host_without_slurm(ssh_env, tmp_path, kernels_dir):
    """A `host` that is no login node (no sbatch on its PATH): one line, nothing started."""
    server = SshServer(tmp_path / "sshd", Path(f"{ssh_env.identity_file}.pub"),
                       session_env={"PATH": "/usr/local/nothing:/nothing"})  # fmt: skip
    server.start()
    try:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(server.known_hosts_line())
        config = {"host": f"{ssh_env.user}@127.0.0.1:{server.port}", "ssh_config": None,
                  "identity_file": str(ssh_env.identity_file), "known_hosts": str(known_hosts),
                  "python": PYTHON, "slurm": {}}  # fmt: skip
        name = write_spec(kernels_dir, "no_slurm_here", config, metadata=CURVE_DECLARED)
        driver = Driver("async", name)
        with pytest.raises(Exception) as failure:
            driver.start()
        assert str(failure.value) == (
            f"sbatch was not found on 127.0.0.1:{server.port}: `host` must be a Slurm login "
            f"node (one where sbatch, squeue and scancel work in an SSH session)"
        )
        driver.close()
    finally:
        server.close()


def test_jupyter_execute(slurm, slurm_spec, tmp_path):
    notebook = write_notebook(tmp_path / "job.ipynb", code(WHERE))
    proc = subprocess.run(
        [script("jupyter"), "execute", f"--kernel_name={slurm_spec(slurm={'gpus': 1})}",
         str(notebook), "--output=out", "--timeout=60", "--startup_timeout=120"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id, hostname, gpus, _ = stdout_of(read_notebook(tmp_path / "out.ipynb").cells[0]).split()
    assert hostname in slurm.nodes and gpus == "0"
    assert slurm.job_state(job_id)["JobState"] in ("CANCELLED", "COMPLETED"), "the job ended"
    assert our_jobs(slurm) == []
