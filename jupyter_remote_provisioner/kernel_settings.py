"""What one kernel needs to run remotely, resolved from its kernelspec's config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .sites.slurm_request import SlurmRequest
from .target import Target

IPYKERNEL_ARGV = ["-m", "ipykernel_launcher", "-f", "{connection_file}"]


@dataclass(frozen=True)
class KernelSettings:
    """Everything needed to run one kernel remotely (from the kernelspec's config)."""

    target: Target
    python: str = "python3"
    kernel_argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    path_map: Mapping[str, str] = field(default_factory=dict)
    upload: tuple[str, ...] = ()
    transport: str = "ipc"
    connect_timeout: float = 15.0
    launch_timeout: float = 60.0
    keepalive_interval: float = 15.0
    reconnect_timeout: float = 600.0
    orphan_timeout: float | None = 600.0
    connection_persist: float = 300.0
    output_buffer: float = 64.0  # MiB of output kept for a client that is away
    slurm: SlurmRequest | None = None  # run in a Slurm job submitted through the host

    @property
    def on_network(self) -> bool:
        """The kernel listens on a network address (a Slurm node's), not on loopback or
        Unix sockets: it must encrypt."""
        return self.slurm is not None

    def argv(self) -> list[str]:
        """The remote command: ``kernel_argv`` when given, else ipykernel on ``python``."""
        return list(self.kernel_argv) if self.kernel_argv else [self.python, *IPYKERNEL_ARGV]
