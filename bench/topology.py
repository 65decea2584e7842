"""The jump topology of ``bench_peers.py``: real sshds in network namespaces, delay relays.

    1 jump:  this machine ──(relay: +D ms each way)──> bastion ──> target 198.18.2.2:22
    2 jumps: this machine ──(relay)──> bastion ──> jump2 198.18.2.1:2200 ──> target
    direct:  this machine ──(relay)──> bastion 198.18.1.2:22 (the kernel runs there)

The namespaces are the tests' :class:`netns.Topology` (``<prefix>b`` bastion, ``<prefix>t``
target; only the bastion reaches the target). The bastion namespace runs two sshds (the
bastion, and a second jump host ``jump2`` on its inner address) and one ``delay_relay.py``
per delay > 0, listening on 198.18.1.2:2222 (2223, ...) and relaying to the bastion's port
22, so the relay port presents the bastion's host key. Everything is undone by ``close()``.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import bench_kernels as bk  # also puts tests/ on sys.path
from bench_kernels import LOCAL, progress, write_kernelspec
from peers_common import (
    BenchSshServer,
    sshpyk_ssh_options,
    stop_control_masters,
    write_sshpyk_spec,
    write_sshpyk_target_spec,
)

from netns import BASTION_ADDR, TARGET_ADDR, Topology, live_topologies
from sshd import current_user, generate_keypair, ssh_config_block

JUMP2_ADDR, JUMP2_PORT = "198.18.2.1", 2200  # the bastion's inner address
RELAY_PORT = 2222  # the first delayed bastion port; further delays take the next ports
RELAY = Path(__file__).resolve().parent / "delay_relay.py"
READY_TIMEOUT = 10.0  # relay prints "ready"
STOP_TIMEOUT = 5.0
OTHER_TOPOLOGY_WAIT = 120.0  # a test run's namespaces use the same addresses: wait for them
SIDES = ("local", "direct", "jump1", "jump2", "sshpyk")
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass
class Route:
    """The kernelspecs of every side for one delay between this machine and the bastion."""

    delay_ms: float
    bastion: str  # ssh_config alias of the bastion, relay-fronted when delay_ms > 0
    port: int
    specs: dict[str, str] = field(default_factory=dict)  # side -> kernelspec
    sshpyk_aliases: tuple[str, ...] = ()  # sshpyk's Host aliases (target first)

    @property
    def name(self) -> str:
        return f"{self.delay_ms:g}ms"


def _die_with_parent() -> None:
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the relay dies with the bench


class BenchTopology(Topology):
    """The tests' namespaces, created only when no other topology is alive, root only."""

    def create(self) -> BenchTopology:
        if os.geteuid() != 0:
            raise RuntimeError("the jump topology needs root (ip netns); try --loopback")
        deadline = time.monotonic() + OTHER_TOPOLOGY_WAIT
        while others := live_topologies(self.prefix):
            if time.monotonic() > deadline:
                raise RuntimeError(f"network namespaces of {others} still exist (same addresses)")
            progress(f"waiting for the namespaces of {others} (a test run?) to go")
            time.sleep(5)
        super().create()
        return self


class DelayRelay:
    """``delay_relay.py`` run inside a namespace."""

    def __init__(self, ns: str, listen: str, connect: str, delay_ms: float, log: Path) -> None:
        self.argv = ["ip", "netns", "exec", ns, sys.executable, str(RELAY), "--listen", listen,
                     "--connect", connect, "--delay-ms", f"{delay_ms:g}"]  # fmt: skip
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (set up from the main thread)
            )  # fmt: skip
        assert self.proc.stdout is not None
        out = b""
        deadline = time.monotonic() + READY_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"ready\n" not in out and time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    out += chunk
        if b"ready\n" not in out:
            self.stop()
            raise RuntimeError(f"delay relay did not start: {self.log.read_text()[-500:]!r}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


class JumpEnvironment(bk.Environment):
    """Jupyter dirs, keys, the namespaces, three sshds, relays, ssh configs and kernelspecs."""

    def __init__(self, delays: list[float], with_sshpyk: bool) -> None:
        super().__init__()  # the temp dir and the saved JUPYTER_* variables
        self.delays = delays
        self.with_sshpyk = with_sshpyk
        self.topology = BenchTopology()
        self.servers: list[BenchSshServer] = []
        self.relays: list[DelayRelay] = []
        self.routes: list[Route] = []
        self.ssh = self.root / "ssh"
        self.sshpyk_config = self.ssh / "ssh_config_sshpyk"

    def remote_specs(self) -> list[str]:
        return [s for r in self.routes for side, s in r.specs.items() if side != "local"]

    def setup(self) -> None:
        root, ssh = self.root, self.ssh
        for d in (root / "data", root / "runtime", root / "config", ssh / "cm"):
            d.mkdir(parents=True)
        os.environ.update(
            JUPYTER_PATH=str(root / "data"),
            JUPYTER_DATA_DIR=str(root / "data"),
            JUPYTER_RUNTIME_DIR=str(root / "runtime"),
            JUPYTER_CONFIG_DIR=str(root / "config"),
        )
        key = generate_keypair(ssh / "id_ed25519")
        # An empty HOME: sessions skip the user's shell startup files, as in the tests.
        home = ssh / "home"
        home.mkdir()
        write_sshpyk_target_spec(home)  # sshpyk's remote side starts it by name
        self.topology.create()
        topo, env = self.topology, {"HOME": str(home)}
        for name, addr, port, ns in (
            ("bastion", BASTION_ADDR, 22, topo.bastion),
            ("jump2", JUMP2_ADDR, JUMP2_PORT, topo.bastion),
            ("target", TARGET_ADDR, 22, topo.target),
        ):
            server = BenchSshServer(
                ssh / name, Path(f"{key}.pub"), addr, port=port, netns=ns, session_env=env
            )
            self.servers.append(server)
            server.start()
        bastion = self.servers[0]
        known_hosts = [s.known_hosts_line() for s in self.servers]
        slow = [d for d in self.delays if d > 0]
        for d in self.delays:
            port = 22 if d == 0 else RELAY_PORT + slow.index(d)
            alias = "bastion" if d == 0 else "bastion_slow" + ("" if d == slow[0] else f"_{d:g}ms")
            self.routes.append(Route(d, alias, port))
            if d > 0:
                relay = DelayRelay(topo.bastion, f"{BASTION_ADDR}:{port}", f"{BASTION_ADDR}:22",
                                   d, ssh / f"relay_{port}.log")  # fmt: skip
                self.relays.append(relay)
                relay.start()
                known_hosts.append(bastion.known_hosts_line(f"[{BASTION_ADDR}]:{port}"))
        (ssh / "known_hosts").write_text("".join(known_hosts))
        self._write_configs(key, ssh / "known_hosts")
        self._write_specs()

    def _write_configs(self, key: Path, known_hosts: Path) -> None:
        client = {
            "User": current_user(),
            "IdentityFile": key,
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": known_hosts,
            "StrictHostKeyChecking": "yes",
        }
        hosts: dict[str, dict[str, object]] = {"bastion": {"HostName": BASTION_ADDR, "Port": 22}}
        hosts |= {r.bastion: {"HostName": BASTION_ADDR, "Port": r.port} for r in self.routes}
        hosts["jump2"] = {"HostName": JUMP2_ADDR, "Port": JUMP2_PORT}
        hosts["target"] = {"HostName": TARGET_ADDR}  # its jump hosts come from the kernelspec
        (self.ssh / "ssh_config").write_text(
            "".join(ssh_config_block(a, {**o, **client}) for a, o in hosts.items())
        )
        # sshpyk: ControlMaster on every hop, the target reached by ProxyJump (ssh -J).
        sshpyk = {**client, **sshpyk_ssh_options(self.ssh / "cm")}
        blocks = [ssh_config_block(r.bastion, {**hosts[r.bastion], **sshpyk}) for r in self.routes]
        for r in self.routes:
            r.sshpyk_aliases = (f"target_via_{r.bastion}", r.bastion)
            options = {"HostName": TARGET_ADDR, "ProxyJump": r.bastion, **sshpyk}
            blocks.append(ssh_config_block(r.sshpyk_aliases[0], options))
        self.sshpyk_config.write_text("".join(blocks))

    def _write_specs(self) -> None:
        kernels = self.root / "data" / "kernels"
        write_kernelspec(
            kernels,
            LOCAL,
            {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
             "display_name": "bench local", "language": "python", "interrupt_mode": "signal"},
        )  # fmt: skip
        for r in self.routes:
            r.specs["local"] = LOCAL
            for side, host, jump in (
                ("direct", r.bastion, []),
                ("jump1", "target", [r.bastion]),
                ("jump2", "target", [r.bastion, "jump2"]),
            ):
                # sshd's PATH may find a python3 without ipykernel: run this interpreter.
                config: dict[str, object] = {
                    "host": host,
                    "ssh_config": str(self.ssh / "ssh_config"),
                    "python": sys.executable,
                }
                if jump:
                    config["jump"] = jump
                r.specs[side] = f"jrp_{side}_{r.name}"
                write_kernelspec(
                    kernels,
                    r.specs[side],
                    {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                     "display_name": f"bench {side} {r.name}", "language": "python",
                     "interrupt_mode": "signal",
                     "metadata": {"kernel_provisioner": {
                         "provisioner_name": "remote-ssh-provisioner", "config": config}}},
                )  # fmt: skip
            if self.with_sshpyk:
                r.specs["sshpyk"] = f"sshpyk_{r.name}"
                write_sshpyk_spec(kernels, r.specs["sshpyk"], self.sshpyk_config,
                                  r.sshpyk_aliases[0])  # fmt: skip

    def stop_sshpyk(self, route: Route) -> None:
        """Stop sshpyk's ControlMasters of ``route`` (and any ssh process on our temp dir)."""
        stop_control_masters(self.sshpyk_config, route.sshpyk_aliases, str(self.root))

    def close(self, remote_kernel_ids: list[str]) -> None:
        for step in (
            *(lambda r=r: self.stop_sshpyk(r) for r in self.routes),
            *(relay.stop for relay in self.relays),
            *(server.close for server in self.servers),  # also kills what sessions started
            self.topology.destroy,  # kills whatever is left in the namespaces
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (undo the rest)
                progress(f"warning: cleanup step failed: {exc!r}")
        super().close(remote_kernel_ids)  # kernel dirs, temp dir, JUPYTER_* variables
