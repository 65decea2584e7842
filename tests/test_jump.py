"""A kernel on a target that only the bastion reaches (network namespaces), under both managers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from drivers import KINDS, Driver
from kernels import run_cell
from netns import BASTION_ADDR, TARGET_ADDR

pytestmark = pytest.mark.timeout(120)

WHERE = "import os; print(os.environ['SSH_CONNECTION'])"


def run_remote(kind: str, kernel_name: str) -> str:
    driver = Driver(kind, kernel_name)
    try:
        driver.start()
        out, reply = run_cell(driver.client(), WHERE)
        assert reply["status"] == "ok"
        driver.shutdown()
        return out
    finally:
        driver.close()


@pytest.mark.parametrize("kind", KINDS)
def test_proxyjump_from_ssh_config(jump_spec, no_leftovers, kind):
    client_ip, _, server_ip, _ = run_remote(kind, jump_spec()).split()
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
    assert run_remote("async", name).split()[2] == TARGET_ADDR


def test_no_ssh_config_every_hop_explicit(jump_spec, topology, no_leftovers):
    """Without an ssh config, identity and known_hosts apply to every hop."""
    name = jump_spec(
        host=f"{topology.user}@{TARGET_ADDR}:22",
        jump=[f"{topology.user}@{BASTION_ADDR}"],
        ssh_config=None,
        identity_file=str(topology.identity_file),
        known_hosts=str(topology.known_hosts),
    )
    assert run_remote("blocking", name).split()[2] == TARGET_ADDR


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
