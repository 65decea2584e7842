"""Helpers for client tests: small notebooks, their outputs, and where their kernel ran."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_notebook

BIN = os.path.dirname(sys.executable)

# A cell printing the SSH session the kernel runs in. The printed line reads
# "SSH_CONNECTION=<client ip> <client port> <server ip> <server port>"; the echoed source has
# a quote after the "=", so a pattern for the printed line never matches the source.
WHO = 'import os\nprint("SSH_CONNECTION=" + str(os.environ.get("SSH_CONNECTION")))'
_WHO_LINE = re.compile(r"SSH_CONNECTION=(\S+) (\d+) (\S+) (\d+)")


def script(name: str) -> str:
    """A console script of this Python installation (not a shim that may pick another).

    A missing one fails the test with the way to install it; client tests never skip.
    """
    path = os.path.join(BIN, name)
    found = path if os.path.isfile(path) else shutil.which(name)
    assert found, f"{name!r} is not installed; run pip install -e '.[test]'"
    return found


def code(source: str, *tags: str) -> NotebookNode:
    cell = new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def write_notebook(path: Path, *cells: NotebookNode) -> Path:
    """Write a notebook whose own metadata names the local ``python3`` kernel.

    So a client runs it remotely only if it honours the kernel name it was given.
    """
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def read_notebook(path: Path) -> NotebookNode:
    assert path.exists(), f"{path} was not written"
    return nbformat.read(path, as_version=4)


def stdout_of(cell: dict[str, Any]) -> str:
    """The text a cell printed to stdout."""
    return "".join(
        o["text"]
        for o in cell.get("outputs", [])
        if o["output_type"] == "stream" and o["name"] == "stdout"
    )


def all_stdout(nb: NotebookNode) -> str:
    return "".join(stdout_of(cell) for cell in nb.cells)


def cell_errors(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """A cell's error outputs."""
    return [o for o in cell.get("outputs", []) if o["output_type"] == "error"]


def errors_of(nb: NotebookNode) -> list[dict[str, Any]]:
    return [o for cell in nb.cells for o in cell_errors(cell)]


def assert_ran_through(text: str, ssh_env: Any) -> None:
    """``text`` holds the WHO line of a kernel in a session of the test sshd ``ssh_env``.

    Only a kernel started through that sshd has SSH_CONNECTION ending in its address and
    port; the test process itself has no such SSH_CONNECTION, so the line cannot come from
    a local kernel that merely inherited the environment.
    """
    local = os.environ.get("SSH_CONNECTION", "")
    assert not local.endswith(f" {ssh_env.port}"), f"the test runs in an SSH session: {local}"
    found = _WHO_LINE.search(text)
    assert found, f"no SSH_CONNECTION line (the kernel ran locally?) in output:\n{text}"
    client_ip, _, server_ip, server_port = found.groups()
    assert (client_ip, server_ip, int(server_port)) == (ssh_env.host, ssh_env.host, ssh_env.port), (
        f"the kernel ran in another SSH session: {found.group(0)}"
    )
