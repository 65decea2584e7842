"""The SSH connection outlives its last kernel for ``connection_persist`` seconds, like
OpenSSH's ControlPersist: the next kernel on that host starts without a new handshake, the
connection closes when the time passes, and the end of the process closes it at once."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from jupyter_remote_provisioner import loop

from drivers import ssh_connection_of
from kernels import remote_processes, wait_for

pytestmark = pytest.mark.timeout(120)


def loop_thread_alive() -> bool:
    return any(t.name == loop.THREAD_NAME for t in threading.enumerate())


def test_next_kernel_reuses_the_connection(jump_spec):
    """Closing one notebook and opening another through the bastion: one SSH connection."""
    name = jump_spec()
    first = ssh_connection_of("async", name)
    assert ssh_connection_of("async", name) == first  # same client address and port on the target


def test_no_persist_means_a_new_connection(jump_spec):
    name = jump_spec(connection_persist=0)
    assert ssh_connection_of("async", name) != ssh_connection_of("async", name)


def test_kept_connection_closes_when_the_time_passes(remote_spec, remote_tmp, no_leftovers):
    ssh_connection_of("async", remote_spec(connection_persist=2))
    # Right after the shutdown the connection (its remote agent) and our loop are still there
    assert remote_processes(remote_tmp) and loop_thread_alive()
    wait_for(lambda: not remote_processes(remote_tmp), 30, "the kept connection to close")
    wait_for(lambda: not loop_thread_alive(), 10, "the loop thread to end")


SCRIPT = """
import sys
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
kc.stop_channels()
km.shutdown_kernel()
print("shut down", flush=True)
"""


def test_process_exit_closes_the_kept_connection(remote_spec, remote_tmp, no_leftovers):
    """`jupyter execute`, papermill, a script: the process ends as soon as its work is done,
    and its kept connection goes with it."""
    name = remote_spec(connection_persist=600)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "shut down\n", proc.stderr
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    wait_for(lambda: not remote_processes(remote_tmp), 30, "the remote agent to end")
