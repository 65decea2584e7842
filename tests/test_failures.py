"""Each failure gives one line that says what failed and what to do, in bounded time,
and leaves nothing behind (no listener, thread, remote process or remote file)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from disks import mounted_tmpfs
from jupyter_client.manager import AsyncKernelManager

from jupyter_remote_provisioner import pool

from drivers import KINDS, Driver
from kernels import wait_for
from sshd import free_port, generate_keypair

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    """Every failure is checked under AsyncKernelManager and the blocking KernelManager."""
    return request.param


MARGIN = 2.0  # seconds beyond a configured timeout for a failure to arrive (process, loop)
IMMEDIATE = 5.0  # seconds for a failure that waits for no timeout (refused, bad key, …)


def start_error(
    kernel_name: str, kind: str, within: float = IMMEDIATE, after: float = 0.0, **start: Any
) -> str:
    """Start the kernel, expect a failure; return its message after checking its shape."""
    driver = Driver(kind, kernel_name)
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as info:
            driver.start(**start)
    finally:
        driver.close()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert not pool.POOL.has_idle(), "a failed start kept its SSH connection"
    assert "\n" not in message and message, repr(message)
    assert after <= elapsed < within, f"the error took {elapsed:.1f} s: {message}"
    return message


def test_refused_port(direct_spec, ssh_env, no_leftovers, kind):
    message = start_error(direct_spec(host=f"{ssh_env.host}:{free_port()}"), kind)
    assert "refused the SSH connection" in message and "sshd runs there" in message


def test_authentication_failure(direct_spec, tmp_path, no_leftovers, kind):
    stranger = generate_keypair(tmp_path / "stranger")
    message = start_error(direct_spec(identity_file=str(stranger)), kind)
    assert "authentication as" in message and "authorized_keys" in message


def test_unknown_host_key(direct_spec, ssh_env, tmp_path, no_leftovers, kind):
    """The hint, followed as printed, records the key in the kernelspec's known_hosts (a bare
    `ssh` would write to ~/.ssh/known_hosts instead), and then the kernel starts."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    name = direct_spec(known_hosts=str(empty))
    message = start_error(name, kind)
    hint = re.search(r"is not in (\S+); run `([^`]+)` once to check and add it$", message)
    assert hint is not None and hint[1] == str(empty), message
    assert f"-o UserKnownHostsFile={empty} " in hint[2]
    user_file = Path.home() / ".ssh" / "known_hosts"
    before = user_file.read_bytes() if user_file.exists() else None
    ssh, *rest = shlex.split(hint[2])  # as a user who answers "yes" to ssh's question:
    answer_yes = ["-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes"]
    subprocess.run([ssh, *answer_yes, "-i", str(ssh_env.identity_file), *rest, "true"],
                   capture_output=True, timeout=30, check=True)  # fmt: skip
    assert (user_file.read_bytes() if user_file.exists() else None) == before
    assert ssh_env.server.host_public_key in empty.read_text()
    driver = Driver(kind, name)
    try:
        driver.start()
    finally:
        driver.close()


def test_unknown_host_key_behind_a_jump_host(direct_spec, ssh_env, tmp_path, no_leftovers):
    """The same through a jump host (the loopback sshd, named localhost, reaching itself):
    the hint's nested command works as printed for a user whose key is in ssh-agent."""
    known = tmp_path / "known_hosts"
    known.write_text(ssh_env.server.known_hosts_line(f"[localhost]:{ssh_env.port}"))
    me = f"{ssh_env.user}@localhost:{ssh_env.port}"
    name = direct_spec(host=f"{ssh_env.user}@127.0.0.1:{ssh_env.port}", jump=[me],
                       known_hosts=str(known))  # fmt: skip
    message = start_error(name, "blocking")
    hint = re.search(r"run `([^`]+)` once to check and add it$", message)
    assert hint is not None and "ProxyCommand=" in hint[1], message
    ssh, *rest = shlex.split(hint[1])
    agent = subprocess.run(
        ["ssh-agent", "-s"], capture_output=True, text=True, timeout=10, check=True
    )
    env = dict(os.environ, **dict(re.findall(r"(SSH_\w+)=([^;]+);", agent.stdout)))
    try:
        subprocess.run(["ssh-add", str(ssh_env.identity_file)], env=env, capture_output=True,
                       timeout=10, check=True)  # fmt: skip
        answer_yes = ["-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes"]
        subprocess.run([ssh, *answer_yes, *rest, "true"], env=env, capture_output=True,
                       timeout=30, check=True)  # fmt: skip
    finally:
        os.kill(int(env["SSH_AGENT_PID"]), signal.SIGTERM)
    assert known.read_text().count(ssh_env.server.host_public_key) == 2  # (maybe hashed)
    driver = Driver("blocking", name)
    try:
        driver.start()
    finally:
        driver.close()


def test_changed_host_key(direct_spec, ssh_env, tmp_path, no_leftovers, kind):
    other = generate_keypair(tmp_path / "other_host_key")
    changed = tmp_path / "known_hosts"
    public = Path(f"{other}.pub").read_text().split()
    changed.write_text(f"[{ssh_env.host}]:{ssh_env.port} {public[0]} {public[1]}\n")
    message = start_error(direct_spec(known_hosts=str(changed)), kind)
    assert "does NOT match" in message and "ssh-keygen" in message


def test_remote_tmp_fills_up(remote_spec, ssh_env, remote_tmp, no_leftovers, caplog):
    """A notebook fills the remote /tmp while its kernel runs: that kernel goes on (it
    reconnects, it is not taken for dead), and a new start fails in one line that names the
    full directory and the remedy, leaving nothing there."""
    caplog.set_level(logging.INFO)
    base = remote_tmp / f"jupyter-remote-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    spec = remote_spec(keepalive_interval=1.0, connect_timeout=3.0)
    filling = (
        f"import contextlib\nwith open({str(base / 'big')!r}, 'wb') as f, "
        "contextlib.suppress(OSError):\n    while True: f.write(bytes(65536)); f.flush()"
    )
    with mounted_tmpfs(base, "size=1m,mode=0700"):
        running = Driver("blocking", spec)
        try:
            running.start()
            kc = running.client()
            assert kc.execute_interactive(filling, timeout=30)["content"]["status"] == "ok"
            before = sorted(os.listdir(base))
            message = start_error(spec, "blocking")
            assert message == (
                f"remote kernel on testhost ({ssh_env.host}:{ssh_env.port}): cannot write a "
                f"kernel's files in {base}: No space "
                f"left on device; free space on its file system, or set TMPDIR to another "
                f"directory for SSH logins to this host"
            )
            assert sorted(os.listdir(base)) == before
            ssh_env.server.kill_all_sessions()
            wait_for(lambda: "Reconnected to" in caplog.text, 30, "the reconnect")
            kc.wait_for_ready(timeout=30)
            assert kc.execute_interactive("x = 1", timeout=30)["content"]["status"] == "ok"
            assert running.is_alive()
        finally:
            running.close()


def test_missing_remote_python(remote_spec, no_leftovers, kind):
    message = start_error(remote_spec(python="/nonexistent/bin/python3"), kind)
    assert "was not found" in message and "`python`" in message


def test_remote_python_without_ipykernel(remote_spec, tmp_path, no_leftovers, kind):
    venv = tmp_path / "bare"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = str(venv / "bin" / "python")
    message = start_error(remote_spec(python=python), kind)
    assert (
        "ipykernel is not installed" in message and f"{python} -m pip install ipykernel" in message
    )


def test_kernel_exits_during_start(remote_spec, no_leftovers, kind):
    argv = ["python3", "-c", "import sys; sys.stderr.write('boom-marker\\n'); sys.exit(3)",
            "{connection_file}"]  # fmt: skip
    message = start_error(remote_spec(kernel_argv=argv), kind)
    assert "exited with status 3" in message and "boom-marker" in message


def test_kernel_that_never_listens_times_out(remote_spec, no_leftovers, kind):
    argv = ["python3", "-c", "import time; time.sleep(600)", "{connection_file}"]
    spec = remote_spec(kernel_argv=argv, launch_timeout=2)
    message = start_error(spec, kind, within=2 + MARGIN, after=2)
    assert "did not start listening within 2 s" in message


def test_missing_remote_cwd(remote_spec, no_leftovers, kind):
    message = start_error(remote_spec(cwd="/nonexistent/project"), kind)
    assert "/nonexistent/project does not exist" in message


def test_remote_cwd_that_is_a_file(remote_spec, tmp_path, no_leftovers, kind):
    (tmp_path / "notes.txt").write_text("")
    message = start_error(remote_spec(cwd=str(tmp_path / "notes.txt")), kind)
    assert message.endswith(f"remote working directory {tmp_path}/notes.txt is not a directory")


def test_zero_launch_timeout(remote_spec, no_leftovers, kind):
    """Refused like every timeout that would leave no time (it used to become 60 s)."""
    message = start_error(remote_spec(launch_timeout=0), kind)
    assert message == "launch_timeout must be a number of seconds > 0, not 0"


def test_env_name_with_equals_sign(remote_spec, no_leftovers, kind):
    message = start_error(remote_spec(env={"A=B": "1"}), kind)
    assert message.startswith(
        "invalid environment variable 'A=B' in metadata.kernel_provisioner.config.env: "
    )


def test_unsafe_remote_base_dir(remote_spec, ssh_env, tmp_path, no_leftovers, kind):
    """The agent's own reason, once, as the agent's (not as python failing to start), with
    its remedy: here the private base dir on the host is open to other users."""
    root = tmp_path / "rtmp"
    base = root / f"jupyter-remote-{os.getuid()}"
    base.mkdir(parents=True)
    base.chmod(0o755)
    python = tmp_path / "python3"  # the remote python, with a TMPDIR of its own
    python.write_text(f'#!/bin/sh\nTMPDIR={root} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    message = start_error(remote_spec(python=str(python)), kind)
    assert message == (
        f"the remote agent on {ssh_env.alias} ({ssh_env.host}:{ssh_env.port}) cannot start: "
        f"{base} is open to other users (mode 755); run `chmod 700 {base}` on the host"
    )


def test_unknown_config_key(remote_spec, no_leftovers, kind):
    message = start_error(remote_spec(hostname="oops"), kind)
    assert "'hostname'" in message and "valid keys: host, jump" in message


def test_missing_host(remote_spec, no_leftovers, kind):
    message = start_error(remote_spec(host=""), kind)
    assert "no `host`" in message


def test_invalid_port(remote_spec, no_leftovers, kind):
    message = start_error(remote_spec(host="gpu:99999"), kind)
    assert "invalid port" in message


def start_error_during(cut, restore, kernel_name: str, kind: str, **bounds: float) -> str:
    """``start_error`` while a fault made by ``cut()`` lasts; ``restore()`` undoes it."""
    cut()
    try:
        return start_error(kernel_name, kind, **bounds)
    finally:
        restore()


def test_unreachable_host(jump_spec, topology, no_leftovers, kind):
    """The bastion's link is down: no answer within connect_timeout."""
    net = topology.topology
    spec = jump_spec(host="bastion", connect_timeout=3)
    message = start_error_during(
        net.cut_link, net.restore_link, spec, kind, within=3 + MARGIN, after=3
    )
    assert "host bastion" in message and "no answer" in message


def test_jump_host_down(jump_spec, topology, no_leftovers, kind):
    bastion = topology.bastion
    message = start_error_during(bastion.stop, bastion.start, jump_spec(), kind)
    assert "jump host bastion" in message and "refused" in message


def test_target_behind_jump_unreachable(jump_spec, topology, no_leftovers, kind):
    net = topology.topology
    spec = jump_spec(connect_timeout=3)
    message = start_error_during(
        net.cut_target, net.restore_target, spec, kind, within=3 + MARGIN, after=3
    )
    assert "host gpu" in message and "through jump host bastion" in message


def test_cancelled_start_leaves_nothing(jump_spec, topology, no_leftovers):
    """A start abandoned by its caller (while SSH is still connecting) cleans up too."""
    net = topology.topology
    name = jump_spec(host="bastion", connect_timeout=30)

    async def abandon() -> None:
        km = AsyncKernelManager(kernel_name=name)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(km.start_kernel(), 1)

    net.cut_link()
    try:
        asyncio.run(abandon())
    finally:
        net.restore_link()


def test_missing_upload(remote_spec, tmp_path, no_leftovers, kind):
    message = start_error(remote_spec(upload=["data.csv"]), kind, cwd=str(tmp_path))
    assert message == (
        f"upload of 'data.csv' failed: local path {tmp_path / 'data.csv'} does not exist; "
        f"check the path"
    )
