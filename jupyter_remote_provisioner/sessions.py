"""``ps``, ``stop`` and ``attach``: the kernels this package runs on remote hosts.

Kernels live in the remote agent's daemon (one per user and interpreter on a host), so they
can outlive their Jupyter server: kept with ``orphan_timeout: null``, or during a network
outage. These commands ask each daemon the kernelspecs point at, over the same SSH chain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loop
from .agent import AgentError, AgentLost, RemoteAgent
from .errors import ConfigError, RemoteKernelError
from .kernel import RemoteKernel
from .kernel_settings import KernelSettings
from .kernelspec import find_spec, list_remote_specs
from .launcher import exit_code, kernel_end_or, log_to_stderr
from .provisioner import settings_from_config
from .signals import foreground_signals
from .sites import site_for
from .sites.slurm import job_kernels
from .ssh import Connection, private_connection

STOP_TIMEOUT = 20.0  # seconds for the remote stop (SIGTERM, then SIGKILL after 5 s)
SHORT_ID = 8

log = logging.getLogger("jupyter_remote_provisioner.attach")


def register(subparsers: Any) -> None:
    ps = subparsers.add_parser(
        "ps",
        help="list the kernels running on the hosts of remote kernelspecs",
        description="List the kernels this package runs on the host of kernelspec NAME (or of "
        "every remote kernelspec): id, kernelspec, age, busy or idle and for how long (from "
        "the kernel's status messages), its last output, the clients attached, how long it "
        "has been unattended, and when it will be stopped if unattended (orphan_timeout, "
        "counted once it is both unattended and idle).",
    )
    ps.add_argument("name", nargs="?", help="a kernelspec's slug or display name")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ps.set_defaults(run=run_ps)
    stop = subparsers.add_parser(
        "stop",
        help="stop a remote kernel by id",
        description="Stop a kernel listed by `ps` (SIGTERM, SIGKILL after 5 s) and remove "
        "its files. ID may be a unique prefix.",
    )
    stop.add_argument("id", help="the kernel id, or a unique prefix of it")
    stop.add_argument("--name", help="only look on the host of this kernelspec")
    stop.set_defaults(run=run_stop)
    attach = subparsers.add_parser(
        "attach",
        help="forward a running remote kernel and write a connection file for it",
        description="Forward a kernel listed by `ps` to local ports, write its connection "
        "file and stay in the foreground (reconnecting if the link drops), so any client can "
        "connect: `jupyter console --existing FILE`. Ctrl-C detaches; the kernel runs on.",
    )
    attach.add_argument("id", help="the kernel id, or a unique prefix of it")
    attach.add_argument("--name", help="only look on the host of this kernelspec")
    attach.add_argument(
        "-f",
        "--connection-file",
        dest="connection_file",
        metavar="FILE",
        help="where to write the connection file (default: kernel-ID.json in Jupyter's "
        "runtime directory, which `--existing kernel-ID.json` finds)",
    )
    attach.set_defaults(run=run_attach)


@dataclass
class Host:
    """One way to a remote daemon: a target and interpreter, and the kernelspecs that use it.
    Kernelspecs may reach one daemon in several ways (an alias and an address, another key
    file): :func:`distinct_kernels` tells the kernels apart by what the daemon reports."""

    settings: KernelSettings
    specs: list[str] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    machine: str | None = None  # the remote host's identity, as its daemon reports it
    error: str = ""

    @property
    def label(self) -> str:
        return self.settings.target.host.label


@dataclass
class Listed:
    """One remote kernel, with the first way that reached it and every kernelspec that did."""

    info: dict[str, Any]
    host: Host
    specs: list[str]

    @property
    def kernel_id(self) -> str:
        return str(self.info["kernel"])


def hosts_of(name: str | None) -> list[Host]:
    """The distinct (target, python) of kernelspec ``name``, or of every remote kernelspec."""
    specs = [find_spec(name)] if name else list_remote_specs()
    if not specs:
        raise ConfigError("no remote kernelspecs are installed; add one with `remote_kernel add`")
    hosts: dict[tuple[Any, str], Host] = {}
    for spec in specs:
        try:
            settings = settings_from_config(spec.config)
        except RemoteKernelError as exc:
            print(f"skipping kernelspec {spec.slug}: {exc}", file=sys.stderr)
            continue
        host = hosts.setdefault((settings.target, settings.python), Host(settings))
        host.specs.append(spec.slug)
    return list(hosts.values())


@contextlib.asynccontextmanager
async def connected_agent(
    settings: KernelSettings, on_hop: Callable[[int, float], None] | None = None
) -> AsyncIterator[tuple[Connection, RemoteAgent]]:
    """A private connection to the target with the agent running (and the connection, for
    other commands on the host); closed on exit."""
    target, timeout = settings.target, settings.connect_timeout
    async with private_connection(target, timeout, settings.keepalive_interval, on_hop) as conn:
        assert conn.ssh is not None
        agent = await RemoteAgent.start(conn.ssh, settings.python, target.host.label, timeout, 0)
        conn.resources["agent"] = agent
        yield conn, agent


async def _list(host: Host) -> None:
    """Fill ``host.kernels`` (or ``host.error``)."""
    try:
        async with connected_agent(host.settings) as (conn, agent):
            if host.settings.slurm is not None:  # the kernels are in jobs, on nodes
                host.kernels = await job_kernels(conn, host.settings)
                return
            reply = await agent.request("list", reply_timeout=host.settings.connect_timeout)
        host.kernels = list(reply.get("kernels", []))
        host.machine = reply.get("host_id")
    except (RemoteKernelError, AgentError, AgentLost, asyncio.TimeoutError) as exc:
        host.error = str(exc) or "no answer from the remote agent"


async def _list_all(hosts: list[Host]) -> None:
    await asyncio.gather(*(_list(host) for host in hosts))


def distinct_kernels(hosts: list[Host]) -> list[Listed]:
    """The kernels the hosts listed, each once: a kernel is its host's identity, its id, pid
    and directory there, whichever name or key file the kernelspec reached it by."""
    found: dict[tuple[Any, ...], Listed] = {}
    for host in hosts:
        for k in host.kernels:
            key = (host.machine, k.get("job"), str(k["kernel"]), k.get("pid"), k.get("dir"))
            listed = found.setdefault(key, Listed(k, host, []))
            listed.specs.extend(s for s in host.specs if s not in listed.specs)
    return list(found.values())


def _unreached(hosts: list[Host]) -> list[Host]:
    return [host for host in hosts if host.error]


def run_ps(args: argparse.Namespace) -> int:
    hosts = hosts_of(args.name)
    asyncio.run(_list_all(hosts))
    kernels = distinct_kernels(hosts)
    if args.json:
        listing = [dict(k.info, host=k.host.label, kernelspecs=k.specs) for k in kernels]
        print(json.dumps(listing, indent=2))
    elif kernels:
        _print_table(kernels)
    elif len(_unreached(hosts)) < len(hosts):  # an unreachable host is not an empty one
        reached = [host.label for host in hosts if not host.error]
        where = f" on {', '.join(reached)}" if _unreached(hosts) else ""
        print(f"No remote kernels running{where}.")
    for host in _unreached(hosts):
        print(f"cannot list the kernels on {host.label}: {host.error}", file=sys.stderr)
    return 1 if _unreached(hosts) else 0


def _print_table(kernels: list[Listed]) -> None:
    table: list[tuple[str, ...]] = [
        ("ID", "KERNELSPEC", "HOST", "AGE", "STATE", "LAST OUTPUT", "CLIENTS", "UNATTENDED",
         "IF UNATTENDED", "TIME LEFT")
    ]  # fmt: skip
    now = time.time()
    for host, k in ((listed.host, listed.info) for listed in kernels):
        if k.get("pending"):
            table.append((str(k["kernel"])[:SHORT_ID], "?", f"{host.label} (job {k['job']})",
                          "-", f"queued ({k.get('reason')})", "-", "0", "-", "-", "-"))  # fmt: skip
            continue
        where = f"{k['node']} (job {k['job']})" if "job" in k else host.label
        left, orphaned = k.get("time_left"), k.get("orphaned_for")
        table.append((
            str(k["kernel"])[:SHORT_ID], k.get("kernel_name") or "?", where,
            _duration(now - float(k.get("started", now))), _state(k), _ago(k.get("quiet_for")),
            str(k.get("attached", 0)), "-" if orphaned is None else _duration(float(orphaned)),
            _fate(k), "-" if left is None else _duration(float(left)),
        ))  # fmt: skip
    if not any("job" in listed.info for listed in kernels):  # no Slurm kernel: no time limit
        table = [row[:-1] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _state(kernel: dict[str, Any]) -> str:
    """busy/idle (from the kernel's own status messages) and for how long."""
    state, since = kernel.get("state"), kernel.get("state_for")
    if not state:
        return "?"
    return state if since is None else f"{state} {_duration(float(since))}"


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{_duration(float(seconds))} ago"


def _fate(kernel: dict[str, Any]) -> str:
    """What happens to the kernel when no client holds it: the orphan_timeout counts from
    when it is both unattended and idle."""
    timeout, orphaned = kernel.get("orphan_timeout"), kernel.get("orphaned_for")
    if timeout is None:
        return "kept"
    if kernel.get("state") == "busy":
        return f"kept while busy, stopped {_duration(float(timeout))} after"
    if orphaned is None:
        return f"stopped {_duration(float(timeout))} after"
    idle_for = kernel.get("state_for") if kernel.get("state") == "idle" else None
    waited = float(orphaned) if idle_for is None else min(float(orphaned), float(idle_for))
    return f"stopped in {_duration(max(0.0, float(timeout) - waited))}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def find_kernel(prefix: str, name: str | None) -> tuple[Host, str]:
    """The host running the one kernel whose id starts with ``prefix``, and its full id."""
    if not prefix.strip():
        raise RemoteKernelError(
            "no kernel id given; pass the id of a kernel (or a unique prefix of it) that "
            "`remote_kernel ps` lists"
        )
    hosts = hosts_of(name)
    asyncio.run(_list_all(hosts))
    matches = [k for k in distinct_kernels(hosts) if k.kernel_id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0].host, matches[0].kernel_id
    if matches:
        ids = ", ".join(k.kernel_id for k in matches)
        raise RemoteKernelError(f"{prefix} matches several kernels ({ids}); give more of the id")
    unreached = _unreached(hosts)
    problems = "; ".join(f"{host.label}: {host.error}" for host in unreached)
    if len(unreached) == len(hosts):
        raise RemoteKernelError(
            f"cannot look for kernel {prefix}: could not reach {problems}; run the command "
            f"again once the host is reachable"
        )
    where = ", ".join(host.label for host in hosts if not host.error)
    if unreached:
        raise RemoteKernelError(
            f"no kernel {prefix} is running on {where}, and it may run where the command "
            f"could not look ({problems}); run it again once that host is reachable"
        )
    raise RemoteKernelError(
        f"no kernel {prefix} is running on {where}; `remote_kernel ps` lists the kernels"
    )


def run_stop(args: argparse.Namespace) -> int:
    host, kernel_id = find_kernel(args.id, args.name)
    how = asyncio.run(_stop(host, kernel_id))
    print(f"Stopped kernel {kernel_id} on {host.label} ({how}).")
    return 0


async def _stop(host: Host, kernel_id: str) -> str:
    settings = host.settings
    target, timeout = settings.target, settings.connect_timeout
    async with private_connection(target, timeout, settings.keepalive_interval) as conn:
        try:
            site = site_for(kernel_id, settings, log)
            return await asyncio.wait_for(site.stop_kernel(conn, kernel_id), STOP_TIMEOUT)
        except AgentError as exc:
            raise RemoteKernelError(f"cannot stop kernel {kernel_id}: {exc}") from None
        except (AgentLost, asyncio.TimeoutError):
            raise RemoteKernelError(
                f"lost the connection to {host.label} while stopping kernel {kernel_id}; "
                f"`remote_kernel ps` shows whether it still runs"
            ) from None


def run_attach(args: argparse.Namespace) -> int:
    chosen = Path(args.connection_file).expanduser().absolute() if args.connection_file else None
    if chosen is not None:
        _check_writable(chosen)  # before any connection is made
    host, kernel_id = find_kernel(args.id, args.name)
    path = chosen or Path(_runtime_file(kernel_id)).absolute()
    _check_writable(path)
    log_to_stderr()
    kernel = RemoteKernel(kernel_id, host.settings, log)
    return asyncio.run(_attach(kernel, path))


def _check_writable(path: Path) -> None:
    """Fail with one line if the connection file could not be written at ``path``: it is a
    directory, or its nearest existing parent is not a directory we may write in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    problem = (
        "it is a directory" if path.is_dir()
        else f"{parent} is not a directory" if not parent.is_dir()
        else f"{parent} is not writable" if not os.access(parent, os.W_OK | os.X_OK)
        else ""
    )  # fmt: skip
    if problem:
        raise RemoteKernelError(
            f"cannot write the connection file {path}: {problem}; give another path with -f"
        )


def _runtime_file(kernel_id: str) -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), f"kernel-{kernel_id}.json")


async def _attach(kernel: RemoteKernel, path: Path) -> int:
    """Forward the kernel, write its connection file, wait for Ctrl-C or its end."""
    detach = asyncio.Event()
    loop.acquire()
    try:
        info = await loop.call(kernel.attach())
        try:
            _write_connection_file(path, info)
        except OSError as exc:
            raise RemoteKernelError(
                f"cannot write the connection file {path}: {exc.strerror or exc}; give "
                f"another path with -f (the kernel keeps running)"
            ) from None
        with foreground_signals(detach.set):
            print(f"Attached to kernel {kernel.kernel_id} on {kernel.settings.target.describe()}.\n"
                  f"Connection file: {path}\n"
                  f"  jupyter console --existing {path}\n"
                  f"Ctrl-C detaches; the kernel keeps running.", flush=True)  # fmt: skip
            ended = await kernel_end_or(kernel, detach)
        if ended.done():
            print(f"The kernel ended (exit status {kernel.exit_status}).", flush=True)
            return exit_code(kernel.exit_status)
        ended.cancel()
        print("Detached; the kernel keeps running.", flush=True)
        return 0
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        try:
            await loop.call(kernel.close(keep_kernel=True))
        finally:
            loop.release()


def _write_connection_file(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` to ``path`` with mode 0600 (it holds the session key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
