"""Run Jupyter kernels on remote machines over SSH, as ordinary kernels."""

from .errors import RemoteKernelError

__version__ = "0.1.0"

__all__ = ["RemoteKernelError", "__version__"]
