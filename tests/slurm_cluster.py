"""A real Slurm cluster in network namespaces: a login node and two compute nodes.

The login node ``<prefix>l`` runs sshd, munged and slurmctld; the compute nodes ``<prefix>n1``
and ``<prefix>n2`` run slurmd. Addresses: root 198.18.5.1 <-> 198.18.5.2 login; login 198.18.6.1
on a bridge with n1 198.18.6.11 and n2 198.18.6.12 (a cluster of another process running at the
same time takes the next free pair of /24s, and nodes c<i>n1, c<i>n2). The login node does not
forward and the guard route makes 198.18.6.0/24 unreachable from the root namespace, so the test
process reaches only the login node. Jobs are tracked by cgroup (proctrack/cgroup, cgroup v1
freezer), as on real clusters: a process a job step leaves behind dies with the step. Each host has its own hostname (UTS namespace) and
/etc/hosts (a bind mount); the file system is shared, like a cluster's home directories. One
munged serves all hosts through its Unix socket. Jobs run as root (SlurmUser=root), the user the
tests log in as. Everything lives in one directory ``<tmp>/jrs<pid>-*``; names carry the pid,
so that a crashed run's leftovers are found and removed (:func:`destroy_stale_clusters`).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from netns import GUARD_ROUTE, destroy_stale, ip, release_guard_route
from slurm_files import NODE_CPUS, NODE_GPUS, remove_cgroups, write_files
from sshd import (
    SSHD,
    SshServer,
    _die_with_parent,
    _in_main_thread,
    current_user,
    generate_keypair,
    kill_pids,
    require_tools,
    ssh_config_block,
    wait_until,
)

if TYPE_CHECKING:
    from typing_extensions import Self

MAX_CLUSTERS = 8  # at once on one machine: 198.18.5.0/24 to 198.18.20.0/24
SETTLE_TIMEOUT = 30.0  # KillWait (5 s) plus a node's COMPLETING time, with room


class _LoginSshd(SshServer):
    """The login node's sshd: ``enter("login", ...)``, not ``ip netns exec``."""

    def __init__(self, enter: Callable[[str, list[str]], list[str]], *a: Any, **kw: Any) -> None:
        self.enter = enter
        super().__init__(*a, **kw)

    def _argv(self) -> list[str]:
        return self.enter("login", [SSHD, "-D", "-e", "-f", str(self.config)])


class SlurmCluster:
    """Namespaces, daemons and ssh client files of one cluster; ``destroy`` removes it all."""

    alias = "login"  # the login node's Host in ``ssh_config``

    def __init__(self, session_env: dict[str, str] | None = None, prefix: str | None = None):
        self.prefix = prefix or f"jrs{os.getpid()}"
        self.root_veth, self.login_veth = f"{self.prefix}r0", f"{self.prefix}r1"
        self.session_env = dict(session_env or {})
        self.user = current_user()
        self._layout(0)
        self.dir = Path(tempfile.gettempdir(), f"{self.prefix}-unset")  # set by create()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # daemons by log name
        self.sshd: SshServer | None = None

    def _layout(self, index: int) -> None:
        """Addresses and names of the ``index``-th cluster alive at once (0: n1, n2 on .5/.6)."""
        net = 5 + 2 * index
        self.root_addr, self.login_addr = f"198.18.{net}.1", f"198.18.{net}.2"
        self.inner_addr = f"198.18.{net + 1}.1"  # the login node on the cluster network
        self.nodes = tuple(f"n{i}" if index == 0 else f"c{index}n{i}" for i in (1, 2))
        self.node_addrs = {n: f"198.18.{net + 1}.{10 + i}" for i, n in enumerate(self.nodes, 1)}
        self.namespaces = {"login": f"{self.prefix}l"}
        self.namespaces |= {n: f"{self.prefix}n{i}" for i, n in enumerate(self.nodes, 1)}

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def job_dir(self) -> Path:
        """A directory for job output files (``--output``), visible on every host."""
        return self.dir / "jobs"

    @property
    def identity_file(self) -> Path:
        return self.dir / "client" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "client" / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """An ssh_config with ``Host login``."""
        return self.dir / "client" / "ssh_config"

    def ssh_argv(self, *remote: str) -> list[str]:
        """An ``ssh`` argv running ``remote`` (a shell command line) on the login node."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                self.alias, *remote]  # fmt: skip

    def env(self) -> dict[str, str]:
        """Our environment plus ``SLURM_CONF``: for Slurm commands and daemons."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def enter(self, host: str, argv: list[str]) -> list[str]:
        """argv run on ``host``: its network namespace, hostname and /etc/hosts.

        Not ``ip netns exec``: that remounts /sys, and slurmd 22.05 then finds no cgroupfs.
        """
        script = f'hostname {host} && mount --bind {self.dir}/hosts /etc/hosts && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.namespaces[host]}", "unshare", "--uts",
                "--mount", "--propagation", "private", "sh", "-c", script, host, *argv]  # fmt: skip

    # -- building ------------------------------------------------------------------------------

    def create(self) -> Self:
        """Build namespaces, files and daemons; wait (bounded) until both nodes are idle."""
        if os.geteuid() != 0:
            pytest.fail("the Slurm cluster must run as root (ip netns)", pytrace=False)
        require_tools("ip", "nsenter", "unshare", "munged", "slurmctld", "slurmd", "sbatch", SSHD)
        destroy_stale()
        self.destroy()
        atexit.register(self.destroy)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        try:
            self._claim_network()
            self._files()
            self._daemons()
        except BaseException:
            self.destroy()
            raise
        return self

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _claim_network(self) -> None:
        """Build the network on the first address pair no other cluster holds (under a lock)."""
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY)  # a lock that leaves no file behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            used = ip("-o", "addr", "show").stdout
            free = [i for i in range(MAX_CLUSTERS) if f" 198.18.{5 + 2 * i}.1/" not in used]
            if not free:
                raise RuntimeError(f"{MAX_CLUSTERS} Slurm test clusters exist already")
            self._layout(free[0])
            self._network()
        finally:
            os.close(fd)

    def _network(self) -> None:
        login, bridge = self.namespaces["login"], f"{self.prefix}br"
        ip("route", "replace", "unreachable", GUARD_ROUTE)  # first: nothing leaks while we build
        for ns in self.namespaces.values():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", self.root_veth, "type", "veth", "peer", "name", self.login_veth,
           "netns", login)  # fmt: skip
        ip("-n", login, "link", "add", bridge, "type", "bridge")
        links = [(None, self.root_veth, self.root_addr), (login, self.login_veth, self.login_addr),
                 (login, bridge, self.inner_addr)]  # fmt: skip
        for node, addr in self.node_addrs.items():
            outer, inner = f"{self.namespaces[node]}a", f"{self.namespaces[node]}b"
            ip("-n", login, "link", "add", outer, "type", "veth", "peer", "name", inner,
               "netns", self.namespaces[node])  # fmt: skip
            ip("-n", login, "link", "set", outer, "master", bridge, "up")
            links.append((self.namespaces[node], inner, addr))
        for in_ns, dev, dev_addr in links:
            where = ["-n", in_ns] if in_ns else []
            ip(*where, "addr", "add", f"{dev_addr}/24", "dev", dev)
            ip(*where, "link", "set", dev, "up")
        subprocess.run(["nsenter", f"--net=/run/netns/{login}", "sysctl", "-qw",
                        "net.ipv4.ip_forward=0"], check=True, timeout=10)  # fmt: skip

    def _files(self) -> None:
        d = self.dir
        write_files(d, self.inner_addr, self.node_addrs)
        key = generate_keypair(self.identity_file)
        env = {**self.session_env, "SLURM_CONF": str(self.conf)}
        self.sshd = _LoginSshd(self.enter, d / "sshd", Path(f"{key}.pub"), self.login_addr, port=22,
                               netns=self.namespaces["login"], session_env=env)  # fmt: skip
        self.known_hosts.write_text(self.sshd.known_hosts_line())
        options = {"HostName": self.login_addr, "User": self.user, "IdentityFile": key,
                   "IdentitiesOnly": "yes", "UserKnownHostsFile": self.known_hosts,
                   "StrictHostKeyChecking": "yes"}  # fmt: skip
        self.ssh_config.write_text(ssh_config_block(self.alias, options))

    def _spawn(self, host: str, name: str, argv: list[str]) -> None:
        with (self.dir / "log" / f"{name}.out").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                self.enter(host, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env=self.env(), preexec_fn=_die_with_parent if _in_main_thread() else None,  # noqa: PLW1509
            )  # fmt: skip

    def _daemons(self) -> None:
        d = self.dir
        self._spawn("login", "munged", ["munged", "--foreground", "--force",
                    f"--key-file={d}/munge/munge.key", f"--socket={d}/run/munge.sock",
                    f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
                    f"--seed-file={d}/munge/seed"])  # fmt: skip
        self._wait("munge socket", (d / "run" / "munge.sock").exists, 10)
        self._spawn("login", "slurmctld", ["slurmctld", "-D", "-c"])  # -c: no old jobs or ids
        for node in self.nodes:
            self._spawn(node, f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait("idle nodes", self._nodes_idle, 20)
        assert self.sshd is not None
        self.sshd.start()

    def _wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        if not wait_until(predicate, timeout, interval=0.02):
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            raise RuntimeError(f"Slurm cluster: {what} not seen in {timeout} s "
                               f"(exited: {dead or 'none'})\n{self.logs()}")  # fmt: skip

    # -- using ---------------------------------------------------------------------------------

    def run_on_login(self, argv: list[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run argv on the login node with ``SLURM_CONF``; output captured as text, rc unchecked."""
        return subprocess.run(self.enter("login", argv), env=self.env(), capture_output=True,
                              text=True, timeout=timeout, check=False, **kw)  # fmt: skip

    def slurm(self, *argv: str) -> str:
        """Run a Slurm command on the login node; its stdout, or RuntimeError with its stderr."""
        res = self.run_on_login(list(argv))
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, *args: str) -> str:
        """Submit from the login node (not over ssh); return the job id."""
        return self.slurm("sbatch", "--parsable", *args).strip().split(";")[0]

    def squeue(self) -> list[dict[str, str]]:
        """Jobs squeue lists (not finished ones): ``id``, ``name``, ``state``, ``reason``, ``node``."""
        out = self.slurm("squeue", "--noheader", "--format=%i|%j|%T|%r|%N")
        keys = ("id", "name", "state", "reason", "node")
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line]

    def job_state(self, jobid: str | int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Reason, RunTime, TimeLimit, NodeList...),
        finished jobs too (for MinJobAge, 300 s); empty when slurmctld does not know the job."""
        res = self.run_on_login(["scontrol", "show", "job", "-o", str(jobid)])
        return dict(re.findall(r"(\S+?)=(\S*)", res.stdout)) if res.returncode == 0 else {}

    def wait_running(self, jobids: list[str], timeout: float = 15) -> dict[str, str]:
        """Wait (bounded) until every job runs; return job id -> node."""
        states: dict[str, dict[str, str]] = {}

        def running() -> bool:
            states.update({j: self.job_state(j) for j in jobids})
            return all(s.get("JobState") == "RUNNING" for s in states.values())

        self._wait(f"jobs {jobids} RUNNING", running, timeout)
        return {j: s["NodeList"] for j, s in states.items()}

    def fill_cluster(self) -> list[str]:
        """Hold every CPU and GPU with one job per node (running when this returns); their ids.

        A job submitted afterwards stays PENDING (reason Resources) until these are cancelled."""
        ids = [self.sbatch("-J", "holder", "-w", n, "-c", str(NODE_CPUS), f"--gres=gpu:{NODE_GPUS}",
                           "-o", "/dev/null", "--wrap", "exec sleep 3600") for n in self.nodes]  # fmt: skip
        self.wait_running(ids)
        return ids

    def cancel_all(self) -> None:
        """Cancel every job, pending or running."""
        self.slurm("scancel", f"--user={self.user}")

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo state (idle, mixed, allocated, completing, down, drained...)."""
        res = self.run_on_login(["sinfo", "--noheader", "--Node", "--format=%N %T"])
        return dict(line.split() for line in res.stdout.splitlines() if line.strip())

    def _nodes_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(n) == "idle" for n in self.nodes)

    def wait_idle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait (bounded) until squeue lists no job and every node is idle; raise with the logs."""
        self._wait("idle cluster", lambda: not self.squeue() and self._nodes_idle(), timeout)

    def node_processes(self, node: str) -> dict[int, str]:
        """pid -> command line of every process on ``node`` except slurmd (jobs, strays)."""
        found = {}
        for pid in _ns_pids(self.namespaces[node]):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if not cmdline.startswith("slurmd "):
                found[pid] = cmdline.strip()
        return found

    def down_node(self, node: str, reason: str = "test") -> None:
        """Take ``node`` out of service (DOWN: its jobs end with NODE_FAIL)."""
        self.slurm("scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason={reason}")

    def up_node(self, node: str) -> None:
        """Put ``node`` back in service."""
        self.slurm("scontrol", "update", f"NodeName={node}", "State=RESUME")

    def cut_login(self) -> None:
        """Cut root <-> login: packets vanish (the login end goes down, routes stay)."""
        ip("-n", self.namespaces["login"], "link", "set", self.login_veth, "down")

    def restore_login(self) -> None:
        """Undo ``cut_login`` and forget failed neighbour lookups made while it was down."""
        ip("-n", self.namespaces["login"], "link", "set", self.login_veth, "up")
        ip("neigh", "flush", "dev", self.root_veth, check=False)
        ip("-n", self.namespaces["login"], "neigh", "flush", "dev", self.login_veth, check=False)

    def logs(self, lines: int = 15) -> str:
        """The last lines of slurmctld's and each slurmd's log, for failure messages."""
        parts = []
        for name in ("slurmctld", *(f"slurmd-{n}" for n in self.nodes)):
            path = self.dir / "log" / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    # -- tearing down --------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill every process on the hosts; delete namespaces, links, route, files. Idempotent."""
        if self.sshd is not None:
            self.sshd.close()
        existing = ip("netns", "list", check=False).stdout.split()
        alive = [ns for ns in self.namespaces.values() if ns in existing]
        for pid in (pid for ns in alive for pid in _ns_pids(ns)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():  # reap our children
            proc.wait(timeout=5)
        self.procs.clear()
        if not wait_until(lambda: not any(_ns_pids(ns) for ns in alive), timeout=5):
            raise RuntimeError(f"processes in {alive} survive SIGKILL")
        for ns in alive:
            ip("netns", "delete", ns)  # its links go with it, and their peers
        ip("link", "delete", self.root_veth, check=False)
        release_guard_route(self.prefix)
        for conf in Path(tempfile.gettempdir()).glob(f"{self.prefix}-*/slurm.conf"):
            for node in re.findall(r"^NodeName=(\S+)", conf.read_text(), re.MULTILINE):
                remove_cgroups(node)
        for leftover in Path(tempfile.gettempdir()).glob(f"{self.prefix}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        atexit.unregister(self.destroy)


def _ns_pids(ns: str) -> list[int]:
    res = ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def destroy_stale_clusters() -> None:
    """Destroy clusters of crashed runs: ``jrs<pid>`` namespaces, links and dirs, pid gone."""
    names = ip("netns", "list", check=False).stdout + ip("-o", "link", "show", check=False).stdout
    names += " ".join(p.name for p in Path(tempfile.gettempdir()).glob("jrs*-*"))
    for pid in {int(p) for p in re.findall(r"\bjrs(\d+)(?:l|n\d+|r0|-\w+)\b", names)}:
        if not os.path.exists(f"/proc/{pid}"):
            SlurmCluster(prefix=f"jrs{pid}").destroy()


@pytest.fixture(scope="session")
def slurm_cluster(remote_session_env: dict[str, str]) -> Iterator[SlurmCluster]:
    """One cluster for the session; login sessions get SLURM_CONF and remote_session_env."""
    with SlurmCluster(remote_session_env) as cluster:
        yield cluster


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session cluster; afterwards the login link is up, nodes in service, every job
    cancelled, the nodes idle and processes left on them (escaped from jobs) killed."""
    yield slurm_cluster
    slurm_cluster.restore_login()
    for node, state in slurm_cluster.node_states().items():
        if state.startswith(("down", "drain")):
            slurm_cluster.up_node(node)
    slurm_cluster.cancel_all()
    slurm_cluster.wait_idle()
    kill_pids([pid for node in slurm_cluster.nodes for pid in slurm_cluster.node_processes(node)])
