"""`remote_kernel check NAME`: each step reported against real sshds, then a verdict."""

from __future__ import annotations

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
