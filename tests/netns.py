"""Network namespaces standing in for separate hosts: root -- bastion -- target.

Addresses: root 198.18.1.1 <-> 198.18.1.2 bastion 198.18.2.1 <-> 198.18.2.2 target.
The bastion does not forward, so only the bastion reaches the target.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from sshd import require_tools, wait_until

if TYPE_CHECKING:
    from typing_extensions import Self

BASTION_ADDR = "198.18.1.2"
TARGET_ADDR = "198.18.2.2"
GUARD_ROUTE = "198.18.0.0/15"  # anything in the test range not on our veths never leaves the host


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise with its stderr on failure when ``check``."""
    res = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def _link_exists(dev: str) -> bool:
    return ip("link", "show", dev, check=False).returncode == 0


def run_in(ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` of argv inside namespace ``ns`` (a timeout is always set)."""
    kw.setdefault("timeout", 30)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=kw.pop("check", False), **kw)


class Topology:
    """Namespaces ``<prefix>b`` (bastion) and ``<prefix>t`` (target) joined by veth pairs."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"jrp{os.getpid()}"
        self.bastion = f"{self.prefix}b"
        self.target = f"{self.prefix}t"
        self.root_veth = f"{self.prefix}a0"  # root side of root <-> bastion
        self.bastion_up_veth = f"{self.prefix}a1"  # bastion side of root <-> bastion
        self.bastion_down_veth = f"{self.prefix}b0"  # bastion side of bastion <-> target
        self.target_veth = f"{self.prefix}b1"  # target side of bastion <-> target
        if len(self.target_veth) > 15:
            raise ValueError(f"prefix {self.prefix!r} too long for interface names")

    def create(self) -> Self:
        """Build the namespaces (after removing leftovers with the same names)."""
        if os.geteuid() != 0:
            pytest.fail("network namespace tests must run as root (ip netns)", pytrace=False)
        require_tools("ip", "sysctl")
        destroy_stale()
        self.destroy()
        atexit.register(self.destroy)
        b, t = self.bastion, self.target
        ip("netns", "add", b)
        ip("netns", "add", t)
        ip("link", "add", self.root_veth, "type", "veth", "peer", "name", self.bastion_up_veth)
        ip("link", "set", self.bastion_up_veth, "netns", b)
        ip("link", "add", self.bastion_down_veth, "type", "veth", "peer", "name", self.target_veth)
        ip("link", "set", self.bastion_down_veth, "netns", b)
        ip("link", "set", self.target_veth, "netns", t)
        ip("addr", "add", "198.18.1.1/24", "dev", self.root_veth)
        ip("link", "set", self.root_veth, "up")
        ip("route", "replace", "unreachable", GUARD_ROUTE)
        ip("route", "add", "198.18.2.0/24", "via", BASTION_ADDR)  # to the bastion, which drops it
        for ns, dev, addr in (
            (b, self.bastion_up_veth, f"{BASTION_ADDR}/24"),
            (b, self.bastion_down_veth, "198.18.2.1/24"),
            (t, self.target_veth, f"{TARGET_ADDR}/24"),
        ):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", b, "link", "set", "lo", "up")
        ip("-n", t, "link", "set", "lo", "up")
        # Route back, so that only the bastion's disabled forwarding separates root and target.
        ip("-n", t, "route", "add", "198.18.1.0/24", "via", "198.18.2.1")
        run_in(b, ["sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)
        route = ip("route", "get", BASTION_ADDR).stdout
        if f" dev {self.root_veth} " not in route:
            raise RuntimeError(f"{BASTION_ADDR} is not routed via {self.root_veth}: {route}")
        return self

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _set_link(self, ns: str | None, dev: str, state: str) -> None:
        ip(*(["-n", ns] if ns else []), "link", "set", dev, state)

    def cut_link(self) -> None:
        """Cut root <-> bastion: packets vanish (the far end goes down, routes stay)."""
        self._set_link(self.bastion, self.bastion_up_veth, "down")

    def restore_link(self) -> None:
        """Undo ``cut_link`` and forget failed neighbour lookups made while it was down."""
        self._set_link(self.bastion, self.bastion_up_veth, "up")
        ip("neigh", "flush", "dev", self.root_veth, check=False)
        ip("-n", self.bastion, "neigh", "flush", "dev", self.bastion_up_veth, check=False)

    def cut_target(self) -> None:
        """Cut bastion <-> target: packets vanish (the target's end goes down)."""
        self._set_link(self.target, self.target_veth, "down")

    def restore_target(self) -> None:
        """Undo ``cut_target`` and forget failed neighbour lookups made while it was down."""
        self._set_link(self.target, self.target_veth, "up")
        ip("-n", self.bastion, "neigh", "flush", "dev", self.bastion_down_veth, check=False)
        ip("-n", self.target, "neigh", "flush", "dev", self.target_veth, check=False)

    def pids(self, ns: str) -> list[int]:
        """Processes running inside namespace ``ns``."""
        res = ip("netns", "pids", ns, check=False)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def _kill_all(self, ns: str) -> None:
        """SIGKILL everything in ``ns`` and wait (bounded) until it is gone."""
        for pid in self.pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not self.pids(ns), timeout=5)

    def destroy(self) -> None:
        """Kill processes in the namespaces, delete namespaces, veths and routes. Idempotent."""
        existing = ip("netns", "list", check=False).stdout.split()
        for ns in (self.bastion, self.target):
            if ns in existing:
                self._kill_all(ns)
                ip("netns", "delete", ns)
        # Deleting a namespace deletes its veth ends, and with them the peers; be thorough.
        for dev in (self.root_veth, self.bastion_down_veth):
            ip("link", "delete", dev, check=False)
        release_guard_route(self.prefix)
        atexit.unregister(self.destroy)
        if not wait_until(lambda: not _link_exists(self.root_veth), timeout=5):
            raise RuntimeError(f"veth {self.root_veth} could not be deleted")


def live_topologies(own: str) -> list[str]:
    """Namespace prefixes ``jrp<pid>`` of other live processes (a test run, the bench)."""
    names = ip("netns", "list", check=False).stdout
    pids = {int(p) for p in re.findall(r"\bjrp(\d+)[bt]\b", names)}
    return [f"jrp{p}" for p in sorted(pids) if f"jrp{p}" != own and os.path.exists(f"/proc/{p}")]


def guard_users(own: str) -> list[str]:
    """Prefixes of live namespaces in the guarded range other than ``own``: topologies
    (``jrp<pid>b``, ``jrp<pid>t``) and Slurm clusters (``jrs<pid>l``, ``jrs<pid>n1``, ...)."""
    names = ip("netns", "list", check=False).stdout
    found = set(re.findall(r"\b(jr[ps])(\d+)(?:[bt]|l|n\d+)\b", names))
    live = {f"{kind}{pid}" for kind, pid in found if os.path.exists(f"/proc/{pid}")}
    return sorted(live - {own})


def release_guard_route(own: str) -> None:
    """Remove the guard route unless namespaces of another live owner still need it."""
    if not guard_users(own):
        ip("route", "delete", "unreachable", GUARD_ROUTE, check=False)


def destroy_stale() -> None:
    """Destroy namespaces left by crashed runs: ``jrp<pid>`` topologies and ``jrs<pid>`` Slurm
    clusters whose pid is gone."""
    names = ip("netns", "list", check=False).stdout + ip("-o", "link", "show", check=False).stdout
    for pid in {int(p) for p in re.findall(r"\bjrp(\d+)(?:b|t|a0)\b", names)}:
        if not os.path.exists(f"/proc/{pid}"):
            Topology(f"jrp{pid}").destroy()
    from slurm_cluster import destroy_stale_clusters  # here: slurm_cluster imports this module

    destroy_stale_clusters()
