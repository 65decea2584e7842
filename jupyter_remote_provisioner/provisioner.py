"""``RemoteSSHProvisioner``: the jupyter_client kernel lifecycle, mapped onto a RemoteKernel.

jupyter_client builds this class with the kernelspec's ``metadata.kernel_provisioner.config``
as keyword arguments. Each step below is thin: the work happens in :mod:`.kernel` on the
package's own event loop (:mod:`.loop`), so SSH traffic flows whatever the caller's loop does.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from string import Template
from typing import Any, cast

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Enum, Float, List, TraitError, Unicode, Union

from . import loop
from .encryption import CURVE_KEYS, declares_curve, keys_of, new_keys, wanted
from .errors import ConfigError, RemoteKernelError
from .identity import local_identity
from .kernel import RemoteKernel
from .kernel_settings import KernelSettings
from .signals import SIGKILL, SIGTERM
from .sites.slurm_request import SlurmRequest
from .target import DEFAULT_SSH_CONFIG, resolve

# Environment variables of the local side that describe the session, not the machine.
SESSION_ENV = ("JPY_SESSION_NAME",)


def remote_env(spec_env: Mapping[str, str], local_env: Mapping[str, str]) -> dict[str, str]:
    """The kernelspec's ``env`` (``${VAR}`` filled from the local environment) plus the
    session variables; the local environment itself never reaches the remote host."""
    env = {k: Template(v).safe_substitute(local_env) for k, v in spec_env.items()}
    env.update({k: local_env[k] for k in SESSION_ENV if k in local_env})
    return env


def check_env(env: Mapping[str, str], where: str) -> None:
    """Refuse what no process environment can hold: an empty name, '=' in a name, a NUL byte
    (the remote host would fail the start with an OS error instead)."""
    for name, value in env.items():
        if not name or "=" in name or "\0" in name + value:
            raise ConfigError(
                f"invalid environment variable {name!r} in {where}: a name must be non-empty "
                f"and have no '=', and neither name nor value may contain a NUL byte"
            )


def settings_from_config(config: Mapping[str, Any]) -> KernelSettings:
    """A kernelspec's provisioner config, validated and resolved as the provisioner does it."""
    return RemoteSSHProvisioner(**config).settings()


class RemoteSSHProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs the kernel on a remote host over SSH, through jump hosts when configured."""

    host = Unicode("", config=True, help="[user@]host[:port] or a Host alias from the ssh config.")
    jump = Union(
        [List(Unicode()), Unicode()],
        default_value=[],
        config=True,
        help="Jump hosts in order, like ssh -J: a list or a comma-separated string.",
    )
    python = Unicode("python3", config=True, help="The remote interpreter that runs ipykernel.")
    kernel_argv = List(
        Unicode(),
        config=True,
        help="Remote command for kernels that are not ipykernel; must contain {connection_file}.",
    )
    env = Dict(value_trait=Unicode(), config=True, help="Environment of the remote kernel.")
    cwd = Unicode(
        None, allow_none=True, config=True, help="Remote working directory (default: home)."
    )
    path_map = Dict(
        value_trait=Unicode(),
        config=True,
        help="Local directory -> remote directory: a notebook under a local one runs in the "
        'matching remote one (created if missing), e.g. {"~/work/proj": "~/projects/proj"}.',
    )
    upload = List(
        Unicode(),
        config=True,
        help="Local files or directories (relative to the notebook's directory) copied to the "
        "kernel's working directory before each start; only what changed is sent.",
    )
    ssh_config = Union(
        [Unicode(), List(Unicode())],
        default_value=DEFAULT_SSH_CONFIG,
        allow_none=True,
        config=True,
        help="ssh config file(s) to read, like ssh does; null turns it off.",
    )
    identity_file = Unicode(None, allow_none=True, config=True, help="Private key to log in with.")
    known_hosts = Unicode(
        None, allow_none=True, config=True, help="known_hosts file (default: ~/.ssh/known_hosts)."
    )
    transport = Enum(
        ["auto", "ipc", "tcp"],
        default_value="auto",
        config=True,
        help="How the remote kernel listens: Unix sockets in a private directory (ipc) or "
        "loopback ports (tcp). auto: ipc for ipykernel, tcp for kernel_argv.",
    )
    connect_timeout = Float(15.0, config=True, help="Seconds allowed for each SSH hop to connect.")
    launch_timeout = Float(60.0, config=True, help="Seconds allowed for the kernel to start.")
    keepalive_interval = Float(
        15.0, config=True, help="Seconds between SSH keepalives; 3 missed ones drop the link."
    )
    reconnect_timeout = Float(
        600.0, config=True, help="Seconds to keep reconnecting after the SSH link drops."
    )
    orphan_timeout = Float(
        600.0,
        allow_none=True,
        config=True,
        help="Seconds a kernel runs on remotely with no client connected and no cell running "
        "before it is stopped (a busy kernel is kept); null keeps it until stopped "
        "(remote_kernel stop).",
    )
    reattach = Bool(
        True,
        config=True,
        help="When Jupyter (jupyter_server) starts a kernel for a notebook, first look on the "
        "host for this notebook's kernel of this kernelspec, kept after its Jupyter server "
        "ended (within orphan_timeout), started by the same local user and held by no client; "
        "reattach to it instead of starting a new one. Never for jupyter execute, nbclient "
        "or papermill (they name no notebook), nor for Slurm kernels.",
    )
    output_buffer = Float(
        64.0,
        config=True,
        help="MiB of the kernel's output the remote side keeps for a client that is away "
        "(network down, laptop asleep, server restarted); beyond it the oldest is dropped, "
        "and the client is told how much.",
    )

    connection_persist = Float(
        300.0,
        config=True,
        help="Seconds the SSH connection stays open after its last kernel ended, so that the "
        "next kernel on that host starts without a new handshake (like OpenSSH's "
        "ControlPersist); 0 closes it at once. Never delays the exit of the process.",
    )

    slurm = Dict(
        default_value=None,
        allow_none=True,
        config=True,
        help="Run the kernel in a Slurm job submitted through `host` (a login node): "
        'sbatch requests such as {"partition": "gpu", "time": "4:00:00", "gpus": 1}, '
        "`options` (more sbatch flags) and `queue_timeout` (seconds a start may wait in the "
        "queue). Absent: the kernel runs on `host` itself.",
    )

    CONFIG_KEYS = (
        "host", "jump", "python", "kernel_argv", "env", "cwd", "path_map", "upload",
        "ssh_config", "identity_file",
        "known_hosts", "transport", "connect_timeout", "launch_timeout", "keepalive_interval",
        "reconnect_timeout", "orphan_timeout", "connection_persist", "slurm", "output_buffer", "reattach",
    )  # fmt: skip
    _BASE_KEYS = ("kernel_id", "kernel_spec", "parent", "config", "log")

    @classmethod
    def check_keys(cls, keys: Iterable[str]) -> None:
        """Refuse keys that are not config keys (jupyter_client would silently drop them)."""
        unknown = sorted(set(keys) - set(cls.CONFIG_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in metadata.kernel_provisioner"
                f".config; valid keys: {', '.join(cls.CONFIG_KEYS)}"
            )

    def __init__(self, **kwargs: Any) -> None:
        self.check_keys(set(kwargs) - set(self._BASE_KEYS))
        try:
            super().__init__(**kwargs)
        except TraitError as exc:
            raise ConfigError(f"invalid metadata.kernel_provisioner.config: {exc}") from None
        if not self.host.strip():
            raise ConfigError(
                "metadata.kernel_provisioner.config has no `host`; set it to [user@]host[:port] "
                "or a Host alias from your ssh config"
            )
        if self.kernel_argv and not any("{connection_file}" in a for a in self.kernel_argv):
            raise ConfigError("kernel_argv must contain {connection_file}")
        self._check_durations()
        check_env(self.env, "metadata.kernel_provisioner.config.env")
        self.connection_info = {}
        self._kernel: RemoteKernel | None = None
        self._remote_env: dict[str, str] = {}
        self._local_dir = os.getcwd()
        self._holds_loop = False
        self._curve: dict[str, str] = {}
        self._notebook: str | None = None  # JPY_SESSION_NAME, from jupyter_server
        self._launched = False  # a kernel was started (or reclaimed): the next is a restart

    # Seconds: 0 would leave no time at all for these...
    POSITIVE = ("connect_timeout", "launch_timeout")
    # ...and means "off" or "at once" for these (orphan_timeout may also be null: never).
    NON_NEGATIVE = ("keepalive_interval", "reconnect_timeout", "orphan_timeout",
                    "connection_persist")  # fmt: skip

    def _check_durations(self) -> None:
        for key in self.POSITIVE + self.NON_NEGATIVE:
            value = getattr(self, key)
            if value is None:
                continue
            floor = "> 0" if key in self.POSITIVE else ">= 0"
            if not (value > 0 if key in self.POSITIVE else value >= 0):
                raise ConfigError(f"{key} must be a number of seconds {floor}, not {value:g}")
        if not self.output_buffer > 0:
            raise ConfigError(
                f"output_buffer must be a number of MiB > 0, not {self.output_buffer:g}"
            )

    # -- settings ----------------------------------------------------------------------

    def settings(self) -> KernelSettings:
        """Resolve the target (ssh config merge) and gather the kernel's settings."""
        ssh_config: Any = ... if self.ssh_config == DEFAULT_SSH_CONFIG else self.ssh_config
        target = resolve(
            self.host, self.jump or None, ssh_config, self.identity_file, self.known_hosts
        )
        slurm = SlurmRequest.from_config(self.slurm) if self.slurm is not None else None
        transport = self.transport
        if transport == "auto":
            transport = "tcp" if self.kernel_argv or slurm else "ipc"
        if slurm is not None and transport != "tcp":
            raise ConfigError(
                "a Slurm kernel runs on a compute node and is reached over the network: "
                "set `transport` to tcp or auto, not ipc"
            )
        return KernelSettings(
            target=target,
            python=self.python,
            kernel_argv=tuple(self.kernel_argv),
            env=dict(self.env),
            cwd=self.cwd,
            path_map=dict(self.path_map),
            upload=tuple(self.upload),
            transport=transport,
            connect_timeout=self.connect_timeout,
            launch_timeout=self.launch_timeout,
            keepalive_interval=self.keepalive_interval,
            reconnect_timeout=self.reconnect_timeout,
            orphan_timeout=self.orphan_timeout,
            connection_persist=self.connection_persist,
            output_buffer=self.output_buffer,
            slurm=slurm,
        )

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self._kernel is not None and self._kernel.pid is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Resolve the target and prepare the remote environment; no local connection file."""
        local_env = dict(kwargs.pop("env", os.environ))
        spec_env = self.kernel_spec.env if self.kernel_spec else {}
        check_env(spec_env, "the kernelspec's env")
        self._remote_env = remote_env(spec_env, local_env)
        kwargs.pop("extra_arguments", None)
        # jupyter_server, nbclient and papermill pass the notebook's directory as cwd
        self._local_dir = kwargs.get("cwd") or os.getcwd()
        # jupyter_server (only) names the notebook: its kernel may be reclaimed later
        self._notebook = local_env.get("JPY_SESSION_NAME") or None
        settings = self.settings()
        if self._kernel is None:
            self._kernel = RemoteKernel(self.kernel_id or str(uuid.uuid4()), settings, self.log)
        else:
            self._kernel.settings = settings
        kwargs["cmd"] = settings.argv()
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the remote kernel and its forwards; return connection info with local ports."""
        assert self._kernel is not None, "pre_launch was not called"
        km = self.parent
        session = getattr(km, "session", None)
        key = session.key if session is not None else uuid.uuid4().hex.encode()
        info = {
            "key": key,
            "signature_scheme": getattr(session, "signature_scheme", "hmac-sha256"),
            "kernel_name": getattr(km, "kernel_name", "") or "",
            **self._encryption(self._kernel.settings.transport),
        }
        if not self._holds_loop:
            loop.acquire()
            self._holds_loop = True
        kernel = self._kernel
        kernel.tag = self._reclaim_tag(kernel.settings)
        try:
            connection_info = None
            if kernel.tag is not None and not self._launched:  # a restart starts afresh
                connection_info = await loop.call(kernel.reclaim(info["kernel_name"]))
            if connection_info is None:
                connection_info = await loop.call(
                    kernel.start(info, self._remote_env, local_dir=self._local_dir)
                )
        except BaseException:
            # The kernel has closed its forwards and connection; drop the loop too.
            self._kernel = None
            self._release_loop()
            raise
        self._launched = True
        if isinstance(connection_info["key"], str):  # a reclaimed kernel's, read remotely
            connection_info["key"] = connection_info["key"].encode()
        self.connection_info = cast(KernelConnectionInfo, connection_info)
        return self.connection_info

    def _reclaim_tag(self, settings: KernelSettings) -> tuple[str, str] | None:
        """What tags the kernel for a later reclaim: the notebook jupyter_server named, and
        this local user (see ``reattach``); None where reclaiming does not apply."""
        if not self.reattach or not self._notebook or settings.slurm is not None:
            return None
        return (self._notebook, local_identity())

    def _encryption(self, transport: str) -> dict[str, Any]:
        """The Curve keys to start the kernel with, when :func:`.encryption.wanted` says so;
        the same keys on every restart (the client keeps its own), like the session key."""
        km = self.parent
        policy = str(getattr(km, "transport_encryption", "disabled")).lower()
        declared = declares_curve(getattr(self.kernel_spec, "metadata", None))
        if not wanted(policy, declared, transport):
            return {}
        if not hasattr(km, "curve_publickey") or not zmq.has("curve"):
            self.log.warning("jupyter_client (8.10 or newer) or pyzmq here cannot use CurveZMQ: "
                             "the kernel runs unencrypted over %s", transport)  # fmt: skip
            return {}
        self._curve = keys_of({k: getattr(km, k, None) for k in CURVE_KEYS}) or (
            self._curve or new_keys()
        )
        return {"curve": self._curve, "curve_required": policy == "required"}

    async def poll(self) -> int | None:
        """The exit status pushed by the remote agent: no network round trip."""
        kernel = self._kernel
        if kernel is None or kernel.pid is None:
            return 0
        if kernel.running:
            return None
        return kernel.exit_status if kernel.exit_status is not None else 0

    async def wait(self) -> int | None:
        """Wait for the remote kernel process to end."""
        kernel = self._kernel
        if kernel is None or kernel.pid is None:
            return 0
        status = await loop.call(kernel.wait())
        kernel.pid = None
        return status

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group on the remote host (through the agent).

        With the link down this fails with one line, except on the way to a shutdown
        (jupyter_client interrupts, then kills): the shutdown completes, and the remote
        host stops the kernel after orphan_timeout.
        """
        kernel = self._kernel
        if kernel is None or kernel.pid is None:
            return
        try:
            await loop.call(kernel.signal(signum))
        except RemoteKernelError:
            if not getattr(self.parent, "shutting_down", False):
                raise
            await loop.call(kernel.abandon())

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """On restart keep the connection and local ports; otherwise release everything.

        ``restart`` is reliable here (cleanup_resources passes it through), unlike in
        terminate()/kill() (jupyter_client #1061), so nothing needs caching beforehand.
        """
        kernel = self._kernel
        if kernel is None or restart:
            return
        self._kernel = None
        try:
            await loop.call(kernel.close())
        finally:
            self._release_loop()

    def _release_loop(self) -> None:
        if self._holds_loop:
            self._holds_loop = False
            loop.release()

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"host": self.host, "jump": self.jump})
        return info
