"""A remote kernel's whole life, as JupyterLab and scripts drive it, under both managers."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from drivers import KINDS, Driver
from kernel_fixtures import PYTHON
from kernels import (
    interrupt_sleeping_cell,
    remote_base,
    remote_kernel_dirs,
    run_cell,
    wait_for,
    write_spec,
)
from sshd import pid_alive

pytestmark = pytest.mark.timeout(120)

WHO = "import os; print(os.environ.get('SSH_CONNECTION', 'local'), os.getpid())"


@pytest.fixture(params=KINDS)
def driver(request, remote_spec, no_leftovers):
    d = Driver(request.param, remote_spec())
    yield d
    d.close()


def test_start_execute_shutdown(driver):
    driver.start()
    info = driver.km.get_connection_info()
    assert info["ip"] == "127.0.0.1" and info["transport"] == "tcp"
    kc = driver.client()
    out, reply = run_cell(kc, WHO)
    assert reply["status"] == "ok"
    ssh_connection, pid = out.split()[:4], int(out.split()[-1])
    assert ssh_connection[0] == "127.0.0.1", "the kernel runs in an SSH session"
    assert pid == driver.provisioner._kernel.pid
    driver.shutdown()
    wait_for(lambda: not pid_alive(pid), 10, "the remote kernel process to end")


def test_remote_files_private_and_key_hidden(driver, remote_tmp):
    driver.start()
    kc = driver.client()
    run_cell(kc, "x = 1")
    (kernel_dir,) = remote_kernel_dirs(remote_tmp)
    path = remote_base(remote_tmp) / kernel_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "connection.json").stat().st_mode) == 0o600
    key = driver.km.session.key.decode()
    args = subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    assert key not in args
    listeners = _loopback_listeners()
    for name in ("shell", "iopub", "stdin", "control", "hb"):
        assert info_port(driver, name) in listeners, f"{name} listens on 127.0.0.1 only"
    driver.shutdown()
    wait_for(lambda: not path.exists(), 10, "the remote kernel dir to be removed")


def test_interrupt_signal_keeps_state(driver):
    driver.start()
    kc = driver.client()
    run_cell(kc, "x = 42")
    reply = interrupt_sleeping_cell(kc, driver.interrupt)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    out, reply = run_cell(kc, "print(x)")
    assert (out.strip(), reply["status"]) == ("42", "ok"), reply


def test_interrupt_message_mode(request, remote_spec, no_leftovers):
    driver = Driver("async", remote_spec(interrupt_mode="message"))
    request.addfinalizer(driver.close)
    driver.start()
    kc = driver.client()
    run_cell(kc, "x = 7")
    reply = interrupt_sleeping_cell(kc, driver.interrupt)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert run_cell(kc, "print(x)")[0].strip() == "7"


def test_restart_clears_state(driver):
    driver.start()
    provisioner = driver.provisioner
    ports = dict(driver.km.get_connection_info())
    kc = driver.client()
    out, _ = run_cell(kc, "x = 1; " + WHO)
    first_connection, first_pid = out.split()[:4], int(out.split()[-1])
    driver.restart()
    assert driver.provisioner is provisioner
    assert driver.km.get_connection_info()["shell_port"] == ports["shell_port"]
    kc.wait_for_ready(timeout=60)
    out, _ = run_cell(kc, "print('x' in dir()); " + WHO)
    assert out.split()[0] == "False"
    assert int(out.split()[-1]) != first_pid
    assert out.split()[1:5] == first_connection, "the restart opened a new SSH connection"
    assert not pid_alive(first_pid)


def test_kernel_death_is_reported(driver):
    driver.start()
    kc = driver.client()
    kc.execute("import os; os._exit(1)")
    wait_for(lambda: not driver.is_alive(), 5, "poll() to report the kernel dead")
    assert driver.provisioner._kernel.exit_status == 1


def restarted_output(kernel_name: str, fault: Callable[[Any], None]) -> str:
    """Start under jupyter_client's restarter (as jupyter_server does), cause ``fault(kc)``,
    wait for the automatic restart and return what ``print(6 * 7)`` prints afterwards."""
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    async def scenario() -> str:
        km = AsyncIOLoopKernelManager(kernel_name=kernel_name)
        restarted = asyncio.Event()
        await km.start_kernel()
        km.add_restart_callback(restarted.set, "restart")
        out: list[str] = []
        try:
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            fault(kc)
            await asyncio.wait_for(restarted.wait(), 30)
            await kc.wait_for_ready(timeout=60)
            await kc.execute_interactive(
                "print(6 * 7)",
                timeout=30,
                output_hook=lambda m: out.append(m["content"].get("text", "")),
            )
            kc.stop_channels()
            return "".join(out).strip()
        finally:
            await km.shutdown_kernel(now=True)

    return asyncio.run(scenario())


def test_automatic_restart_after_death(remote_spec, no_leftovers):
    exit_in_cell = lambda kc: kc.execute("import os; os._exit(1)")
    assert restarted_output(remote_spec(), exit_in_cell) == "42"


def info_port(driver: Driver, name: str) -> int:
    return int(driver.km.get_connection_info()[f"{name}_port"])


def _loopback_listeners() -> set[int]:
    """Ports listening on 127.0.0.1 exactly (not 0.0.0.0)."""
    ports = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and address == "0100007F":
                ports.add(int(port, 16))
    return ports


def test_env_reaches_the_kernel_and_the_local_environment_does_not(
    ssh_env, kernels_dir, no_leftovers, monkeypatch
):
    """The provisioner's `env`, the kernelspec's `env` with ${VAR} filled from the local
    environment (unknown names left as written), and nothing else of the local environment."""
    monkeypatch.setenv("JRP_LOCAL_ONLY", "must-not-travel")
    monkeypatch.setenv("JRP_FILL", "from-the-laptop")
    config = {"host": ssh_env.alias, "ssh_config": str(ssh_env.ssh_config), "python": PYTHON}
    spec_env = {"FILLED": "${JRP_FILL}/data", "UNKNOWN": "${JRP_NOT_SET}"}
    name = write_spec(kernels_dir, "env_test", {**config, "env": {"PLAIN": "1"}}, env=spec_env)
    driver = Driver("blocking", name)
    try:
        driver.start()
        names = ["PLAIN", "FILLED", "UNKNOWN", "JRP_LOCAL_ONLY", "JRP_FILL"]
        code = f"import os, json; print(json.dumps({{k: os.environ.get(k) for k in {names}}}))"
        out, reply = run_cell(driver.client(), code)
        assert reply["status"] == "ok", reply
        assert json.loads(out) == {
            "PLAIN": "1",
            "FILLED": "from-the-laptop/data",
            "UNKNOWN": "${JRP_NOT_SET}",
            "JRP_LOCAL_ONLY": None,
            "JRP_FILL": None,
        }
    finally:
        driver.close()
