"""Shared fixtures: real sshd servers on loopback and in network namespaces."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["kernel_fixtures", "agents", "slurm_cluster"]
from netns import BASTION_ADDR, TARGET_ADDR, Topology
from sshd import (
    SSHD,
    JumpEnv,
    SshEnv,
    SshServer,
    current_user,
    generate_keypair,
    require_tools,
    ssh_config_block,
)


def _client_options(user: str, key: Path, known_hosts: Path) -> dict[str, object]:
    return {
        "User": user,
        "IdentityFile": key,
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": known_hosts,
        "StrictHostKeyChecking": "yes",
    }


@pytest.fixture(scope="session")
def remote_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TMPDIR of every session on the test sshds: their kernels' files land here only."""
    return tmp_path_factory.mktemp("rtmp")


@pytest.fixture(scope="session")
def remote_session_env(
    tmp_path_factory: pytest.TempPathFactory, remote_tmp: Path
) -> dict[str, str]:
    """Environment of every session on the test sshds: a private TMPDIR and an empty HOME.

    With its own HOME a session does not run the user's shell startup files (root's
    ~/.bashrc here runs `pyenv init`, whose rehash lock stalls every later session for 60 s
    when a session is killed mid-rehash), so specs name their python explicitly.
    """
    return {"TMPDIR": str(remote_tmp), "HOME": str(tmp_path_factory.mktemp("rhome"))}


@pytest.fixture(scope="session")
def ssh_env(
    tmp_path_factory: pytest.TempPathFactory, remote_session_env: dict[str, str]
) -> Iterator[SshEnv]:
    """An sshd on 127.0.0.1 and an ssh_config reaching it as ``testhost``."""
    require_tools(SSHD, "ssh", "ssh-keygen")
    d = tmp_path_factory.mktemp("ssh")
    key = generate_keypair(d / "id_ed25519")
    server = SshServer(d / "sshd", Path(f"{key}.pub"), session_env=remote_session_env)
    try:
        server.start()
        known_hosts = d / "known_hosts"
        known_hosts.write_text(server.known_hosts_line())
        user = current_user()
        options = {"HostName": server.host, "Port": server.port}
        options |= _client_options(user, key, known_hosts)
        ssh_config = d / "ssh_config"
        ssh_config.write_text(ssh_config_block("testhost", options))
        yield SshEnv(
            server, server.host, server.port, user, key, known_hosts, ssh_config, "testhost", d
        )
    finally:
        server.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def topology(
    tmp_path_factory: pytest.TempPathFactory, remote_session_env: dict[str, str]
) -> Iterator[JumpEnv]:
    """sshd on a bastion (198.18.1.2) and a target (198.18.2.2) reachable only via it."""
    require_tools(SSHD, "ssh", "ssh-keygen")
    d = tmp_path_factory.mktemp("jump")
    key = generate_keypair(d / "id_ed25519")
    topo = Topology()
    servers: list[SshServer] = []
    try:
        topo.create()
        for name, ns, addr in (
            ("bastion", topo.bastion, BASTION_ADDR),
            ("target", topo.target, TARGET_ADDR),
        ):
            servers.append(
                SshServer(
                    d / name,
                    Path(f"{key}.pub"),
                    addr,
                    port=22,
                    netns=ns,
                    session_env=remote_session_env,
                )
            )
            servers[-1].start()
        bastion, target = servers
        known_hosts = d / "known_hosts"
        known_hosts.write_text(bastion.known_hosts_line() + target.known_hosts_line())
        user = current_user()
        client = _client_options(user, key, known_hosts)
        ssh_config = d / "ssh_config"
        ssh_config.write_text(
            ssh_config_block("bastion", {"HostName": BASTION_ADDR, **client})
            + ssh_config_block("gpu", {"HostName": TARGET_ADDR, "ProxyJump": "bastion", **client})
        )
        yield JumpEnv(topo, bastion, target, key, known_hosts, ssh_config, user, d)
    finally:
        for server in servers:
            server.close()
        topo.destroy()
        shutil.rmtree(d, ignore_errors=True)
