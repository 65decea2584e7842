"""Connection loss: the remote kernel keeps running, the package reconnects through the same
chain and the same local ports, and clients resume with the kernel's state intact.

Faults are real: sshd sessions killed, the link to the bastion cut (network namespaces),
the target's sshd restarted. The kernel runs under jupyter_client's restarter, as in
jupyter_server, so a kernel wrongly reported dead would be restarted and lose its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jupyter_remote_provisioner.errors import RemoteKernelError

from drivers import Driver
from kernels import (
    DAEMON_MARK,
    FAST,
    relays,
    remote_kernels,
    remote_processes,
    run_cell,
    wait_for,
    wait_for_async,
)

pytestmark = pytest.mark.timeout(180)

SLOW_CELL = "import time; time.sleep(4); y = x + 1"


async def until_running(kc: Any, msg_id: str) -> None:
    """Wait (bounded) until the kernel announces on iopub that it runs request ``msg_id``."""
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "execute_input" and msg["parent_header"].get("msg_id") == msg_id:
            return


def survives(
    kernel_name: str,
    caplog: Any,
    fault: Callable[[], None],
    repair: Callable[[], None],
    loss: str = "Lost the SSH connection",
) -> None:
    """Run a cell that is still sleeping when ``fault()`` drops the connection; during the
    outage the kernel is alive for jupyter_client; after ``repair()`` the package reconnects
    and the same kernel (same pid, same local ports) has the state, the sleeping cell's too."""
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
        restarts: list[str] = []
        await km.start_kernel()
        km.add_restart_callback(lambda: restarts.append("restart"), "restart")
        km.add_restart_callback(lambda: restarts.append("dead"), "dead")
        try:
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            ports, pid = km.get_connection_info(), km.provisioner._kernel.pid
            await kc.execute_interactive("x = 41", timeout=30)
            slow = kc.execute(SLOW_CELL)
            await until_running(kc, slow)
            fault()
            await wait_for_async(lambda: loss in caplog.text, 15, "the loss")
            assert await km.is_alive(), "poll() reported the kernel dead during the outage"
            repair()
            await wait_for_async(lambda: "Reconnected to" in caplog.text, 30, "the reconnect")
            # As a client re-syncs (JupyterLab sends kernel_info): shell and iopub are back.
            await kc.wait_for_ready(timeout=30)
            out: list[str] = []
            reply = await kc.execute_interactive(
                "print(x, y)",
                timeout=30,
                output_hook=lambda m: out.append(m["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok", reply["content"]
            assert "".join(out).strip() == "41 42"
            assert restarts == [] and await km.is_alive()
            assert km.get_connection_info() == ports
            assert km.provisioner._kernel.pid == pid
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(scenario())


def test_killed_ssh_sessions(remote_spec, ssh_env, no_leftovers, caplog):
    """sshd's per-connection processes die (as in an sshd crash): reconnect at once."""
    survives(remote_spec(**FAST), caplog, ssh_env.server.kill_all_sessions, lambda: None)


def test_agent_daemon_killed(remote_spec, remote_tmp, no_leftovers, caplog):
    """kill -9 of the remote agent's daemon (its kernels run on): a new daemon adopts the
    kernel and the client resumes on it; no second kernel starts under the same id."""

    def kill_daemon() -> None:
        [pid] = [int(p.split()[0]) for p in remote_processes(remote_tmp) if DAEMON_MARK in p]
        os.kill(pid, signal.SIGKILL)

    agent_closed = "closed its channel (exit status 0); the SSH connection is up"
    survives(remote_spec(**FAST), caplog, kill_daemon, lambda: None, loss=agent_closed)
    assert "Lost the SSH connection" not in caplog.text


def test_loss_noticed_after_three_keepalive_intervals(remote_spec, ssh_env, no_leftovers, caplog):
    """The host falls silent (its sshd frozen, the TCP connection open): the loss is noticed
    3 x keepalive_interval after the last packet came back, as the README says."""
    caplog.set_level(logging.INFO)
    interval = 2.0
    driver = Driver("blocking", remote_spec(keepalive_interval=interval, connect_timeout=3))
    try:
        driver.start()
        kc = driver.client()
        sessions = ssh_env.server.session_pids()
        run_cell(kc, "pass")  # its reply is the last packet before the silence
        for pid in sessions:
            os.kill(pid, signal.SIGSTOP)
        silent = time.monotonic()
        try:
            wait_for(lambda: "Lost the SSH connection" in caplog.text, 5 * interval, "the loss")
            noticed = time.monotonic() - silent
        finally:
            for pid in sessions:
                os.kill(pid, signal.SIGCONT)
        assert 3 * interval - 0.5 < noticed < 3 * interval + 1.0, noticed
        wait_for(lambda: "Reconnected to" in caplog.text, 30, "the reconnect")
        kc.wait_for_ready(timeout=30)  # as a client re-syncs: shell and iopub are back
        assert run_cell(kc, "pass")[1]["status"] == "ok"
    finally:
        driver.close()


def test_kernel_gone_with_its_agent(remote_spec, no_leftovers, caplog):
    """The agent and the kernel are gone at once (as in a reboot): the log says what is known,
    with no guess about orphan_timeout, and the kernel is reported dead."""
    caplog.set_level(logging.INFO)
    driver = Driver("blocking", remote_spec(**FAST))
    try:
        driver.start()
        driver.client()
        kernel = driver.provisioner._kernel
        daemon = kernel._agent.hello["daemon_pid"]
        os.kill(daemon, signal.SIGSTOP)  # so that it cannot report the kernel's end
        os.killpg(kernel.pid, signal.SIGKILL)
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not driver.is_alive(), 30, "the kernel to be reported dead")
        assert (
            f"Remote kernel {kernel.kernel_id} is gone from {kernel.settings.target.describe()}: "
            f"the remote agent that ran it is gone too, so how it ended is unknown"
        ) in caplog.text
        assert "orphan_timeout" not in caplog.text
    finally:
        driver.close()


def test_link_to_bastion_cut_and_restored(jump_spec, topology, remote_tmp, no_leftovers, caplog):
    """Packets to the bastion vanish for longer than the keepalive window on both sides: the
    remote daemon has dropped the silent client (its relay is gone, the kernel an orphan)
    before they flow again."""
    topo = topology.topology

    def restore_once_the_host_dropped_us() -> None:
        wait_for(lambda: not relays(remote_tmp), 30, "the remote daemon to drop the silent client")
        topo.restore_link()

    try:
        survives(jump_spec(**FAST), caplog, topo.cut_link, restore_once_the_host_dropped_us)
    finally:
        topo.restore_link()


@contextlib.contextmanager
def outage(jump_spec: Any, topology: Any, caplog: Any, **config: Any) -> Iterator[Driver]:
    """A kernel started through the bastion, then the bastion's link cut and the loss
    noticed; afterwards the link is restored and the kernel closed."""
    caplog.set_level(logging.INFO)
    driver = Driver("async", jump_spec(**FAST, **config))
    try:
        driver.start()
        driver.client()
        topology.topology.cut_link()
        wait_for(lambda: "Lost the SSH connection" in caplog.text, 15, "the loss")
        yield driver
    finally:
        topology.topology.restore_link()
        driver.close()


def test_kernel_dies_during_an_outage(jump_spec, topology, no_leftovers, caplog):
    """The kernel dies while the link is down: after the reconnect it is reported dead, with
    its exit status if the remote agent still runs (it exits once it has nothing left)."""
    with outage(jump_spec, topology, caplog) as driver:
        os.kill(driver.provisioner._kernel.pid, signal.SIGKILL)
        assert driver.is_alive(), "unknown during the outage: alive for jupyter_client"
        topology.topology.restore_link()
        wait_for(lambda: not driver.is_alive(), 30, "the kernel to be reported dead")
        gone = f"Remote kernel {driver.provisioner._kernel.kernel_id} is gone from"
        assert f"exited with status {-signal.SIGKILL}" in caplog.text or gone in caplog.text


def test_target_sshd_restarted(jump_spec, topology, no_leftovers, caplog):
    """The target's sshd goes down with every session and comes back on the same port."""
    server = topology.target

    def down() -> None:
        server.stop()
        server.kill_all_sessions()

    try:
        survives(jump_spec(**FAST), caplog, down, server.start)
    finally:
        if server.proc is None:
            server.start()


def test_gives_up_after_reconnect_timeout(jump_spec, topology, no_leftovers, caplog):
    """Still unreachable after reconnect_timeout: reported dead, with a log line saying why;
    the remote side drops the silent client and reaps the kernel after orphan_timeout."""
    caplog.set_level(logging.INFO)
    topo = topology.topology
    driver = Driver("blocking", jump_spec(**FAST, reconnect_timeout=4, orphan_timeout=0))
    try:
        driver.start()
        driver.client()
        topo.cut_link()
        wait_for(lambda: not driver.is_alive(), 30, "poll() to report the kernel dead")
        assert "Gave up reconnecting to" in caplog.text
        assert "reconnect_timeout" in caplog.text
    finally:
        topo.restore_link()
        driver.close()


def test_interrupt_and_shutdown_during_an_outage(jump_spec, topology, remote_tmp, caplog):
    """With the link down: an interrupt fails with one line that says why; closing the
    notebook (a shutdown, which jupyter_client starts with an interrupt) completes, and the
    kernel is stopped as soon as the host is reachable again (long before orphan_timeout)."""
    with outage(jump_spec, topology, caplog, orphan_timeout=600) as driver:
        with pytest.raises(RemoteKernelError) as info:
            driver.interrupt()
        assert "\n" not in str(info.value) and "connection is down" in str(info.value)
        driver.shutdown()
        assert not driver.km.has_kernel
        assert "it is stopped once gpu (198.18.2.2) answers again" in caplog.text
        assert remote_kernels(remote_tmp)
        topology.topology.restore_link()
        wait_for(lambda: not remote_kernels(remote_tmp), 30, "the remote kernel to be stopped")
        wait_for(lambda: "reachable again" in caplog.text, 15, "the log of the stop")


def test_restart_during_an_outage(jump_spec, topology, remote_tmp, caplog):
    """A restart with the link down fails in one line that says the host is unreachable;
    the old kernel is stopped once the host is back, and a restart then works."""
    with outage(jump_spec, topology, caplog, orphan_timeout=600) as driver:
        old_pid = driver.provisioner._kernel.pid
        with pytest.raises(Exception) as info:
            driver.restart()
        message = str(info.value)
        assert message.startswith(
            "cannot restart the kernel: jump host bastion (198.18.1.2) is unreachable"
        ), message
        assert message.endswith("the old kernel is stopped once gpu (198.18.2.2) answers again")
        assert "\n" not in message
        topology.topology.restore_link()
        wait_for(lambda: old_pid not in remote_kernels(remote_tmp), 30, "the old kernel to stop")
        driver.start()
        assert driver.client().execute_interactive("1", timeout=30)["content"]["status"] == "ok"


FROZEN_CLIENT = """
import sys
from jupyter_client import AsyncKernelManager
import asyncio

async def main():
    km = AsyncKernelManager(kernel_name=sys.argv[1])
    await km.start_kernel()
    print("started", flush=True)
    sys.stdin.readline()  # resumed: close the notebook at once
    try:
        await km.shutdown_kernel()
    except Exception as exc:
        print("shutdown failed:", type(exc).__name__, exc, flush=True)
        raise SystemExit(1)
    print("shut down", flush=True)

asyncio.run(main())
"""


def test_shutdown_right_after_a_frozen_client_resumes(remote_spec, remote_tmp, no_leftovers):
    """A laptop sleeps (its Jupyter process frozen) longer than the host waits for a silent
    client; on waking, the notebook is closed at once: the shutdown completes without an
    error, and the remote kernel is stopped."""
    client = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLIENT, remote_spec(**FAST, orphan_timeout=600)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "started"  # type: ignore[union-attr]
        client.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not relays(remote_tmp), 30, "the host to drop the frozen client")
        finally:
            client.send_signal(signal.SIGCONT)
        out, _ = client.communicate("close\n", timeout=60)
        assert out.strip() == "shut down" and client.returncode == 0, out
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    wait_for(lambda: not remote_kernels(remote_tmp), 30, "the remote kernel to be stopped")
