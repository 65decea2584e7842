"""Sessions found again: `jupyter lab` killed (`kill -9`) and started again, the same notebook
opened with the same kernelspec gets the kept kernel back (same process, same variables),
with what it printed while no server was there; `jupyter execute` of that notebook never
takes it; the same notebook open in another server meanwhile never shares it.

Driven through jupyter_server's REST API and kernel websocket, as JupyterLab and VS Code
(connected to an existing server) drive it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from typing import Any

import pytest
from test_jupyterlab import LabServer
from test_output_kept import Cell
from tornado.websocket import websocket_connect

from kernels import remote_kernels, rk, wait_for

pytestmark = pytest.mark.timeout(240)
NOTEBOOK = "analysis.ipynb"


def rest(server: LabServer, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.url}{path}", data=data, method=method,
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read()
    return json.loads(text) if text else None


def open_notebook(server: LabServer, kernel_name: str) -> str:
    """Open the notebook as JupyterLab does (a session for its path); the kernel's id."""
    body = {"path": NOTEBOOK, "type": "notebook", "name": NOTEBOOK, "kernel": {"name": kernel_name}}
    return str(rest(server, "POST", "/api/sessions", body)["kernel"]["id"])


class Channels:
    """A kernel websocket, as a JupyterLab page holds it."""

    def __init__(self, server: LabServer, kernel_id: str) -> None:
        self.url = (
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"
            f"?session_id={uuid.uuid4().hex}&token={server.token}"
        )
        self.ws: Any = None

    async def __aenter__(self) -> Channels:  # noqa: PYI034
        self.ws = await websocket_connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ws.close()

    async def execute(self, code: str) -> str:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                  "session": uuid.uuid4().hex, "version": "5.3", "date": ""}  # fmt: skip
        content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
        await self.ws.write_message(json.dumps({
            "header": header, "parent_header": {}, "metadata": {}, "content": content,
            "channel": "shell",
        }))  # fmt: skip
        return msg_id

    async def next(self, timeout: float = 60) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.read_message(), timeout)
        assert text is not None, "the websocket closed"
        return json.loads(text)

    async def run(self, code: str) -> str:
        """Execute and return the cell's printed text once its reply and idle came."""
        msg_id, out, replied, idle = await self.execute(code), [], False, False
        while not (replied and idle):
            msg = await self.next()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            replied |= msg["msg_type"] == "execute_reply"
            idle |= msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
        return "".join(out)


def started_lab(tmp_path: Any) -> LabServer:
    """A `jupyter lab` serving tmp_path/root, started."""
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    server = LabServer(root, state)
    server.start()
    return server


def test_jupyter_lab_killed_and_restarted_gets_the_kept_kernel(
    remote_spec, remote_tmp, tmp_path, no_leftovers
):
    server = started_lab(tmp_path)
    root = server.root
    cell, name = Cell(tmp_path), remote_spec(orphan_timeout=600)
    try:

        async def before_the_kill() -> int:
            async with Channels(server, open_notebook(server, name)) as ch:
                assert await ch.run("x = 41; import os; os.getpid()") == ""
                await ch.execute(cell.code)
                while cell.printed() < 3:
                    await ch.next()
            return remote_kernels(remote_tmp)[0]

        pid = asyncio.run(before_the_kill())
        os.killpg(server.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
        server.proc = None
        at_kill = cell.printed()
        wait_for(lambda: cell.printed() >= at_kill + 5, 30, "lines printed with no server")
        cell.end()  # the cell ends while no server is there

        # jupyter execute of the same notebook never takes the kept kernel
        nb = root / NOTEBOOK
        nb.write_text(json.dumps({
            "cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                       "source": "print('x' in dir())"}],
            "metadata": {"kernelspec": {"name": name, "display_name": name}},
            "nbformat": 4, "nbformat_minor": 5,
        }))  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "jupyter", "execute", "--inplace", str(nb)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "".join(json.loads(nb.read_text())["cells"][0]["outputs"][0]["text"]) == "False\n"
        assert remote_kernels(remote_tmp) == [pid], "jupyter execute left its kernel or took ours"

        server = LabServer(root, server.state)
        server.start()

        async def after_the_restart() -> str:
            async with Channels(server, open_notebook(server, name)) as ch:
                return await ch.run("print(x + 1)")

        # what the page shows in the cell it runs first: the kept kernel's state, after the
        # output printed while no server was there (a page shows only its own cells' output)
        lines = asyncio.run(after_the_restart()).splitlines()
        assert lines[0].startswith("[jupyter-remote-provisioner] output of a cell run before")
        assert lines[-1] == "42", "not the same kernel: its variables are gone"
        assert remote_kernels(remote_tmp) == [pid]
        numbers = [int(line.split()[1]) for line in lines[1:-1]]
        assert lines[-2].startswith("done") and numbers[-1] == numbers[-2] + 1, lines[-3:]
        assert numbers[:-1] == list(range(numbers[0], numbers[-1])), "out of order or repeated"
        assert numbers[0] <= at_kill + 1, "lines printed while the server was down are missing"
        ps = json.loads(rk("ps", name, "--json").stdout)
        assert [k["pid"] for k in ps] == [pid] and ps[0]["attached"] == 1
    finally:
        cell.end()
        server.stop()


def test_the_same_notebook_in_two_servers_never_shares(
    remote_spec, remote_tmp, tmp_path, no_leftovers
):
    """A second server opening the notebook while the first holds its kernel starts its
    own kernel: a kept kernel is reattached only when no client holds it."""
    root = tmp_path / "root"
    root.mkdir()
    name = remote_spec(orphan_timeout=600)
    servers = [LabServer(root, tmp_path / f"state{i}") for i in (1, 2)]
    try:
        pids = []
        for server in servers:
            server.state.mkdir()
            server.start()

            async def value(server: LabServer = server) -> str:
                async with Channels(server, open_notebook(server, name)) as ch:
                    return await ch.run("import os; print(os.getpid())")

            pids.append(int(asyncio.run(value())))
        assert pids[0] != pids[1] and sorted(remote_kernels(remote_tmp)) == sorted(pids)
    finally:
        for server in servers:
            server.stop()


def test_vscode_reload_window_with_an_existing_server(
    remote_spec, remote_tmp, tmp_path, no_leftovers
):
    """VS Code connected to a local Jupyter server that uses this provisioner (the path the
    README gives for VS Code): "Reload Window" drops the kernel websocket while a cell
    prints; VS Code then finds the live kernel by its id in /api/kernels and connects
    again with a new session id. The same remote kernel (same variables) answers, and the
    running cell's output, under its original request, reaches the new connection."""
    server = started_lab(tmp_path)
    cell, name = Cell(tmp_path), remote_spec(orphan_timeout=600)
    try:
        # VS Code names its sessions <notebook>-jvsc-<uuid>.ipynb
        body = {"path": f"analysis-jvsc-{uuid.uuid4()}.ipynb", "type": "notebook",
                "name": NOTEBOOK, "kernel": {"name": name}}  # fmt: skip
        kernel_id = str(rest(server, "POST", "/api/sessions", body)["kernel"]["id"])

        async def before_reload() -> str:
            async with Channels(server, kernel_id) as ch:
                assert await ch.run("x = 41") == ""
                running = await ch.execute(cell.code)
                while cell.printed() < 3:
                    await ch.next()
                return running

        running = asyncio.run(before_reload())
        pid = remote_kernels(remote_tmp)

        async def after_reload() -> tuple[list[str], str]:
            assert kernel_id in [k["id"] for k in rest(server, "GET", "/api/kernels")]
            async with Channels(server, kernel_id) as ch:
                later = cell.printed() + 3
                lines: list[str] = []
                while not lines or int(lines[-1].split()[1]) < later:
                    msg = await ch.next()
                    if (
                        msg["msg_type"] == "stream"
                        and msg["parent_header"].get("msg_id") == running
                    ):
                        lines += msg["content"]["text"].splitlines()
                cell.end()
                return lines, await ch.run("print(x + 1)")

        lines, value = asyncio.run(after_reload())
        assert value == "42\n" and remote_kernels(remote_tmp) == pid
        numbers = [int(line.split()[1]) for line in lines if line.startswith("line")]
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), "out of order or repeated"
    finally:
        cell.end()
        server.stop()
