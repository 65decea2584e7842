"""The command line: ``jupyter remote-kernel …``, also installed as ``remote_kernel …``.

Each subcommand lives in its own module, which adds its parser with ``register(subparsers)``
and sets ``run`` (``args -> exit code``). Expected failures are :class:`RemoteKernelError`:
one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import RemoteKernelError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def program_name(argv0: str | None = None) -> str:
    """``jupyter remote-kernel`` when run through jupyter, else ``remote_kernel``."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "jupyter remote-kernel" if name.startswith("jupyter-remote-kernel") else "remote_kernel"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from . import check, commands, demo, launcher, sessions, sync_command

    parser = argparse.ArgumentParser(
        prog=prog or program_name(),
        description="Remote Jupyter kernels over SSH: add, list, show, check and delete "
        "kernelspecs; list, stop and attach to running remote kernels; copy files to and from "
        "their hosts; launch a kernel (for clients that ignore provisioners); run a demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(subparsers)
    check.register(subparsers)
    launcher.register(subparsers)
    sessions.register(subparsers)
    sync_command.register(subparsers)
    demo.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except RemoteKernelError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
