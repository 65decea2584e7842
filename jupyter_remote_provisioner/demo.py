"""``demo``: the whole path on this machine, with nothing set up by hand.

It starts a throwaway SSH host on 127.0.0.1 (:mod:`.demohost`), registers a kernelspec for
it, starts a kernel through the provisioner as JupyterLab would, runs a cell, shuts the
kernel down and removes everything, timing each step. ``--keep`` leaves the host and the
kernelspec in place and says how to open JupyterLab with them. A failure leaves nothing.
The host runs the remote side here, so the demo needs Linux or macOS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RemoteKernelError
from .kernelspec import build_spec, find_spec, install_spec, remove_spec
from .pool import close_kept_connections

if TYPE_CHECKING:
    from .demohost import DemoHost  # imported in run(): Windows is refused first

KEPT_SLUG = "remote_demo"
CELL = (
    "import os, socket, sys\n"
    "print(f'Hello from {socket.gethostname()}, pid {os.getpid()}, "
    "Python {sys.version.split()[0]}')\n"
    "print('SSH_CONNECTION =', os.environ.get('SSH_CONNECTION'))\n"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a remote kernel on a throwaway SSH host on this machine",
        description="Start a throwaway SSH host on 127.0.0.1 (OpenSSH's sshd when installed, "
        "else an embedded asyncssh server), register a kernelspec for it, start a kernel "
        "through the provisioner, run a cell, print what it printed and how long each step "
        "took, then remove everything.",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the SSH host and a 'Remote demo' kernelspec in place (for JupyterLab)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "openssh", "asyncssh"),
        default="auto",
        help="which SSH server to run (default: openssh when sshd is installed)",
    )
    parser.set_defaults(run=run)


class Steps:
    """Prints each finished step with its duration."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[list[str]]:
        """Time the block; lines it appends to the yielded list are printed under it."""
        details: list[str] = []
        began = time.monotonic()
        yield details
        self.out(f"  [{time.monotonic() - began:5.2f} s] {text}")
        for line in details:
            self.out(f"      | {line}")

    def total(self) -> float:
        return time.monotonic() - self.started


def run(args: argparse.Namespace) -> int:
    if sys.platform == "win32":
        raise RemoteKernelError(
            "the demo runs the remote side on this machine, which needs Linux or macOS; on "
            "Windows run it in WSL, or `remote_kernel add` a Linux host"
        )
    from .demohost import DemoHost

    def out(line: str) -> None:
        print(line, flush=True)

    out("jupyter-remote-provisioner demo: a remote kernel on a throwaway SSH host")
    steps = Steps(out)
    host = DemoHost(Path(tempfile.mkdtemp(prefix="jrp-demo-")), backend=args.backend)
    slug = KEPT_SLUG if args.keep else "demo_remote"
    with _jupyter_dirs(keep=args.keep):
        registered = False
        try:
            with steps.step("started a throwaway SSH host") as details:
                host.start()
                details.append(f"{_backend_name(host)} on {host.host}:{host.port}, as {host.user}")
            with steps.step(f"registered kernelspec {slug}") as details:
                registered = True
                details.append(_register(host, slug))
            _run_kernel(slug, steps)
            if args.keep:
                close_kept_connections()  # the demo's own, before the host moves
                host.detach()
                out(f"Done in {steps.total():.1f} s. Kept for you:")
                out(_kept_text(host, slug))
                return 0
            with steps.step("removed the kernelspec and the SSH host"):
                registered = False
                remove_spec(find_spec(slug))
                host.stop()
        except BaseException:
            if registered:  # a failure leaves no kernelspec pointing at a removed host
                with contextlib.suppress(ConfigError):
                    remove_spec(find_spec(slug))
            raise
        finally:
            host.stop()  # does nothing once detached
    out(f"Done in {steps.total():.1f} s; nothing is left behind.")
    return 0


def _run_kernel(slug: str, steps: Steps) -> None:
    """Start, use and stop a kernel as JupyterLab would (through the provisioner)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=slug)
    try:
        with steps.step("started the kernel through the provisioner (SSH, agent, forwards)"):
            try:
                km.start_kernel()
            except OSError as exc:  # e.g. Jupyter's runtime directory cannot be written
                raise RemoteKernelError(f"cannot start the demo kernel: {exc}") from None
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
        with steps.step("ran a cell; it printed:") as details:
            output: list[str] = []
            reply = kc.execute_interactive(
                CELL, timeout=60, output_hook=lambda msg: output.append(_text(msg))
            )
            details.extend("".join(output).splitlines())
            if reply["content"]["status"] != "ok":
                raise RemoteKernelError(f"the demo cell failed: {reply['content'].get('evalue')}")
        with steps.step("shut the kernel down"):
            kc.stop_channels()
            km.shutdown_kernel()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def _display_name(host: DemoHost) -> str:
    return f"Remote demo ({host.host}:{host.port})"


def _register(host: DemoHost, slug: str) -> str:
    """Install the demo's kernelspec in the user's (or, without --keep, a private) data dir."""
    spec = build_spec(
        _display_name(host),
        host.alias,
        python=sys.executable,
        extra_config={"ssh_config": str(host.ssh_config)},
    )
    return install_spec(spec, slug, user=True, replace=True)


@contextlib.contextmanager
def _jupyter_dirs(keep: bool) -> Iterator[None]:
    """Without --keep, a private Jupyter data dir for the demo's spec (the user's is untouched)."""
    if keep:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("JUPYTER_DATA_DIR", "JUPYTER_PATH")}
    data_dir = Path(tempfile.mkdtemp(prefix="jrp-demo-jupyter-"))
    os.environ["JUPYTER_DATA_DIR"] = str(data_dir)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [str(data_dir), saved["JUPYTER_PATH"]])
    )
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(data_dir, ignore_errors=True)


def _kept_text(host: DemoHost, slug: str) -> str:
    name = _display_name(host)
    root = sys.platform != "win32" and os.geteuid() == 0
    lab = "jupyter lab --allow-root" if root else "jupyter lab"  # it refuses root otherwise
    lines = [
        f'  kernelspec {slug} ("{name}") in your Jupyter kernels',
        "  " + host.describe_kept().replace("\n", "\n  "),
        f'Open JupyterLab and pick "{name}" in the kernel picker:',
        f"  {lab}        (pip install jupyterlab, if it is missing)",
        f"Check it with: remote_kernel check {slug}",
        (
            f"Remove it all with: remote_kernel delete {slug} && kill {host.pid} && "
            f"rm -rf {shlex.quote(str(host.workdir))}"
        ),
    ]
    return "\n".join(lines)


def _backend_name(host: DemoHost) -> str:
    return "OpenSSH sshd" if host.backend == "openssh" else "embedded asyncssh server"


def _text(msg: dict[str, Any]) -> str:
    return str(msg["content"].get("text", "")) if msg["header"]["msg_type"] == "stream" else ""
