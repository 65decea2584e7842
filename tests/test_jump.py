"""A kernel on a target that only the bastion reaches (network namespaces), under both managers."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from drivers import KINDS, Driver, ssh_connection_of
from kernels import run_cell
from netns import BASTION_ADDR, TARGET_ADDR
from sshd import SshServer

pytestmark = pytest.mark.timeout(120)

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY)
RESTRICTED_PORT = 2222


@pytest.mark.parametrize("kind", KINDS)
def test_proxyjump_from_ssh_config(jump_spec, no_leftovers, kind):
    client_ip, _, server_ip, _ = ssh_connection_of(kind, jump_spec()).split()
    assert server_ip == TARGET_ADDR
    assert client_ip == "198.18.2.1", "the target sees the bastion, not this machine"


@pytest.mark.parametrize("jump", [["bastion"], "bastion", f"{BASTION_ADDR}"])
def test_explicit_jump_list(jump_spec, topology, no_leftovers, jump):
    name = jump_spec(
        host=TARGET_ADDR,
        jump=jump,
        identity_file=str(topology.identity_file),
        known_hosts=str(topology.known_hosts),
    )
    assert ssh_connection_of("async", name).split()[2] == TARGET_ADDR


def test_no_ssh_config_every_hop_explicit(jump_spec, topology, no_leftovers):
    """Without an ssh config, identity and known_hosts apply to every hop."""
    name = jump_spec(
        host=f"{topology.user}@{TARGET_ADDR}:22",
        jump=[f"{topology.user}@{BASTION_ADDR}"],
        ssh_config=None,
        identity_file=str(topology.identity_file),
        known_hosts=str(topology.known_hosts),
    )
    assert ssh_connection_of("blocking", name).split()[2] == TARGET_ADDR


def test_two_jump_hosts(jump_spec, topology, no_leftovers):
    """A chain of two jump hosts (the bastion, then the bastion again from itself) carries a
    working kernel; the target sees the last jump host as its client."""
    name = jump_spec(jump=["bastion", "bastion"])  # explicit: replaces gpu's ProxyJump
    client_ip, _, server_ip, _ = ssh_connection_of("async", name).split()
    assert (client_ip, server_ip) == ("198.18.2.1", TARGET_ADDR)
    assert f"from {BASTION_ADDR} port" in topology.bastion.log_text(), "the second hop ran"


@pytest.mark.parametrize("kind", KINDS)
def test_poll_needs_no_network(jump_spec, topology, no_leftovers, kind):
    """With the bastion's link down, poll() still answers at once: the kernel is alive."""
    net = topology.topology
    driver = Driver(kind, jump_spec())
    try:
        driver.start()
        kc = driver.client()
        run_cell(kc, "x = 5")
        net.cut_link()
        try:
            with ThreadPoolExecutor(1) as pool:
                polls = pool.submit(lambda: [driver.is_alive() for _ in range(20)])
                assert polls.result(timeout=5) == [True] * 20
        finally:
            net.restore_link()
        assert run_cell(kc, "print(x)")[0].strip() == "5"
        driver.shutdown()
    finally:
        driver.close()


def socket_option(pid: int, level: int, option: int) -> set[int]:
    """The values of a socket option on the TCP sockets process ``pid`` holds (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    values = set()
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if copy < 0:
                continue
            sock = socket.socket(fileno=copy)
            try:
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
                    values.add(sock.getsockopt(level, option))
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return values


def test_bastion_forwards_without_nagle_delay(jump_spec, topology):
    """A kernel's replies come in bursts of small messages; the bastion's sshd must send
    each at once (TCP_NODELAY) instead of holding it for our delayed ACK (~40 ms a burst).
    OpenSSH's sshd sets it only once a session ran on the connection, so one does."""
    driver = Driver("async", jump_spec())
    try:
        driver.start()
        run_cell(driver.client(), "pass")
        sessions = topology.bastion.session_pids()
        assert sessions, "no sshd process on the bastion holds our connection"
        assert {v for pid in sessions for v in socket_option(pid, *NODELAY)} == {1}
        driver.shutdown()
    finally:
        driver.close()


@pytest.fixture(scope="module")
def forwarding_only_bastion(topology, tmp_path_factory):
    """A second sshd on the bastion that refuses every session and only forwards
    (MaxSessions 0, as restricted bastions do), and a known_hosts that trusts it."""
    d = tmp_path_factory.mktemp("restricted")
    server = SshServer(
        d / "sshd",
        Path(f"{topology.identity_file}.pub"),
        BASTION_ADDR,
        port=RESTRICTED_PORT,
        netns=topology.topology.bastion,
        extra_config=["Match all", "MaxSessions 0"],
    )
    server.start()
    known_hosts = d / "known_hosts"
    known_hosts.write_text(topology.known_hosts.read_text() + server.known_hosts_line())
    try:
        yield server, known_hosts
    finally:
        server.close()


def test_bastion_that_refuses_sessions(jump_spec, topology, forwarding_only_bastion, caplog):
    """Through a forwarding-only bastion the kernel works as usual; the log says why its
    round trips may be slower."""
    known_hosts = forwarding_only_bastion[1]
    refused = subprocess.run(
        ["ssh", "-F", str(topology.ssh_config), "-o", f"UserKnownHostsFile={known_hosts}",
         "-p", str(RESTRICTED_PORT), BASTION_ADDR, "true"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert refused.returncode != 0, "the restricted bastion ran a command"
    name = jump_spec(
        jump=[f"{topology.user}@{BASTION_ADDR}:{RESTRICTED_PORT}"],
        known_hosts=str(known_hosts),
        identity_file=str(topology.identity_file),
    )
    with caplog.at_level(logging.INFO, logger="jupyter_remote_provisioner"):
        client_ip, _, server_ip, _ = ssh_connection_of("async", name).split()
    assert (client_ip, server_ip) == ("198.18.2.1", TARGET_ADDR)
    assert any("refuses sessions" in r.getMessage() for r in caplog.records), caplog.text
