"""`remote_kernel check NAME`: each step reported against real sshds, then a verdict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kernels import rk

pytestmark = pytest.mark.timeout(120)


def add(name: str, *options: str) -> None:
    rk("add", "--name", name, "--replace", *options)


def test_check_through_a_jump_host(topology, no_leftovers):
    add("Check Jump", "--endpoint", "gpu", "--ssh-config", str(topology.ssh_config),
        "--python", sys.executable)  # fmt: skip
    result = rk("check", "Check Jump", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Checking check_jump (Check Jump):")
    assert lines[1].startswith("  [ok]   jump host bastion (198.18.1.2)")
    assert lines[2].startswith("  [ok]   host gpu (198.18.2.2)")
    assert "remote python" in lines[3] and "ipykernel" in lines[4] and "round trip" in lines[5]
    assert lines[-1] == "OK: check_jump is ready to use."


def test_check_reports_the_failing_step(ssh_env, tmp_path, no_leftovers):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    add("Check Unknown Key", "--endpoint", ssh_env.alias, "--ssh-config", str(ssh_env.ssh_config),
        "--known-hosts", str(empty))  # fmt: skip
    result = rk("check", "check_unknown_key", check=False)
    assert result.returncode == 1
    assert "  [FAIL] host key for testhost" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("FAILED: check_unknown_key")
    assert "Traceback" not in result.stderr


def test_check_without_ipykernel(ssh_env, tmp_path, no_leftovers):
    venv = tmp_path / "bare"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    add("Check Bare", "--endpoint", ssh_env.alias, "--ssh-config", str(ssh_env.ssh_config),
        "--python", str(venv / "bin" / "python"))  # fmt: skip
    result = rk("check", "check_bare", check=False)
    assert result.returncode == 1
    assert "[FAIL] ipykernel is not installed" in result.stdout
    assert "-m pip install ipykernel" in result.stdout


def test_check_unknown_name_is_one_line(no_leftovers):
    result = rk("check", "no_such_kernel", check=False)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "no remote kernelspec named" in line


def test_check_header_names_each_jump_hosts_user(ssh_env, no_leftovers):
    """The loopback sshd as its own jump host: the header shows who logs in at every hop."""
    add("Check Self Jump", "--endpoint", ssh_env.alias, "-J", f"{ssh_env.user}@{ssh_env.alias}",
        "--ssh-config", str(ssh_env.ssh_config), "--python", sys.executable)  # fmt: skip
    result = rk("check", "check_self_jump", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    hop = f"{ssh_env.alias} ({ssh_env.host}:{ssh_env.port})"
    assert result.stdout.splitlines()[0] == (
        f"Checking check_self_jump (Check Self Jump): {ssh_env.user}@{hop} via {ssh_env.user}@{hop}"
    )


def test_check_of_a_local_kernelspec_does_not_suggest_removing_it(kernels_dir, no_leftovers):
    local = kernels_dir / "plain_local_check"
    local.mkdir()
    spec = {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    (local / "kernel.json").write_text(json.dumps({**spec, "display_name": "Plain"}))
    for command in ("check", "show"):
        result = rk(command, "plain_local_check", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "kernelspec plain_local_check is not a remote kernel" in line
        assert "remove" not in line
    assert (local / "kernel.json").is_file()
