"""The one exception type users see, with a one-line message that says what to do."""

from __future__ import annotations


class RemoteKernelError(Exception):
    """A failure a user can hit: the message is one line and names the remedy.

    JupyterLab shows it in its "Error Starting Kernel" dialog and the command line prints
    it without a traceback, so it must stand on its own.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(RemoteKernelError):
    """The kernelspec or the ssh config is wrong."""


class ConnectError(RemoteKernelError):
    """The SSH connection (or one of its hops) could not be made."""


class LaunchError(RemoteKernelError):
    """The remote kernel did not start."""


class KernelGone(RemoteKernelError):
    """The place the kernel ran is gone for good (its Slurm job ended): no reconnect helps."""
