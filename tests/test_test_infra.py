"""The test infrastructure itself: real sshd, host key checking, bastion topology."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from netns import TARGET_ADDR, run_in
from sshd import JumpEnv, SshEnv, ssh_cmd, ssh_config_block, wait_until


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run argv with a bound on its duration, capturing text output."""
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def test_ssh_echo_with_strict_host_key_checking(ssh_env: SshEnv) -> None:
    res = run([*ssh_cmd(ssh_env, ssh_env.alias), "echo", "ok"])
    assert res.returncode == 0, res.stderr + ssh_env.server.log_text()
    assert res.stdout == "ok\n"


def test_unknown_host_key_is_rejected(ssh_env: SshEnv) -> None:
    empty = ssh_env.dir / "empty_known_hosts"
    empty.touch()
    config = ssh_env.dir / "stranger_ssh_config"
    options = {
        "HostName": ssh_env.host,
        "Port": ssh_env.port,
        "User": ssh_env.user,
        "IdentityFile": ssh_env.identity_file,
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": empty,
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
    }
    config.write_text(ssh_config_block("stranger", options))
    res = run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "stranger", "echo", "ok"])
    assert res.returncode == 255
    assert "Host key verification failed" in res.stderr
    assert empty.read_text() == ""


def test_restart_keeps_port_and_sessions(ssh_env: SshEnv) -> None:
    server = ssh_env.server
    session = subprocess.Popen(
        [*ssh_cmd(ssh_env, ssh_env.alias), "read line; echo got $line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.port == ssh_env.port
        # Wait (bounded) until the session is established on the server side.
        assert wait_until(lambda: bool(server.session_pids()), timeout=10)
        server.restart()
        assert server.port == ssh_env.port
        res = run([*ssh_cmd(ssh_env, ssh_env.alias), "echo", "again"])
        assert res.stdout == "again\n", res.stderr
        out, _ = session.communicate("hello\n", timeout=10)
        assert out == "got hello\n"  # the established session survived the restart
    finally:
        session.kill()
        session.wait(timeout=5)


def test_kill_all_sessions_drops_connections(ssh_env: SshEnv) -> None:
    server = ssh_env.server
    session = subprocess.Popen([*ssh_cmd(ssh_env, ssh_env.alias), "exec sleep 60"])
    try:

        def sleeping() -> bool:
            return any(_cmdline(p) == ["sleep", "60"] for p in server.spawned_pids())

        assert wait_until(sleeping, timeout=10)
        server.kill_all_sessions()
        assert session.wait(timeout=10) == 255
        assert sleeping()  # what the session started outlives the connection
        server.kill_spawned()
        assert server.spawned_pids() == []
    finally:
        session.kill()
        session.wait(timeout=5)


def test_bastion_reachable(topology: JumpEnv) -> None:
    res = run([*ssh_cmd(topology, "bastion"), "ip -br addr"])
    assert res.returncode == 0, res.stderr + topology.bastion.log_text()
    assert "198.18.1.2/24" in res.stdout and "198.18.2.1/24" in res.stdout


def test_target_not_reachable_from_root_namespace(topology: JumpEnv) -> None:
    with pytest.raises(OSError):
        socket.create_connection((TARGET_ADDR, 22), timeout=2).close()


def test_target_reachable_from_bastion_namespace(topology: JumpEnv) -> None:
    probe = f"import socket; socket.create_connection(('{TARGET_ADDR}', 22), timeout=2).close()"
    res = run_in(topology.topology.bastion, ["python3", "-c", probe], capture_output=True)
    assert res.returncode == 0, res.stderr


def test_target_through_bastion(topology: JumpEnv) -> None:
    res = run([*ssh_cmd(topology, "gpu"), "echo ok; ip -br addr"])
    assert res.returncode == 0, res.stderr + topology.target.log_text()
    assert res.stdout.startswith("ok\n") and "198.18.2.2/24" in res.stdout
