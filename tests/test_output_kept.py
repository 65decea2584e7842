"""Nothing lost while away: what a kernel prints while its client is away arrives once and in
order when the client is back (a link cut, a frozen laptop), bounded by ``output_buffer``;
a kernel running a cell is never reaped as an orphan.

Faults are real: the bastion's link cut (network namespaces), the client process frozen
with SIGSTOP, the client killed. The cells print numbered lines until the test lets them
end, so the test knows exactly which lines must arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from kernels import DAEMON_MARK, FAST, relays, remote_processes, rk, wait_for, wait_for_async

pytestmark = pytest.mark.timeout(240)

NUMBERED = """\
import os, time
i = 0
while not os.path.exists({marker!r}):
    print(f"line {{i}}", flush=True)
    with open({progress!r}, "w") as f:
        f.write(str(i))
    i += 1
    time.sleep(0.2)
print(f"done {{i}}", flush=True)
with open({progress!r}, "w") as f:
    f.write("end")
"""
BIG = """\
import os, time
while not os.path.exists({marker!r}):
    time.sleep(0.05)
for i in range({count}):
    print(f"line {{i}} " + "x" * {pad}, flush=True)
print("done {count}", flush=True)
open({progress!r}, "w").write("printed")
"""
NOTE = re.compile(
    r"\[jupyter-remote-provisioner\] (\d+) output message\(s\) of this kernel were dropped"
)


class Cell:
    """The numbered cell and its files: ``marker`` ends it, ``progress`` says how far it is."""

    def __init__(self, tmp_path: Path) -> None:
        self.marker, self.progress = tmp_path / "stop", tmp_path / "progress"
        self.code = NUMBERED.format(marker=str(self.marker), progress=str(self.progress))

    def printed(self) -> int:
        """How many lines the kernel has printed (-1: none yet)."""
        try:
            return int(self.progress.read_text() or -1)
        except (OSError, ValueError):
            return -1

    def end(self) -> None:
        self.marker.touch()

    def ended(self) -> bool:
        """Has the cell's code run to its end (its reply is on its way)?"""
        return self.progress.exists() and self.progress.read_text() == "end"


def stream_text(cell: Any) -> str:
    return "".join(
        o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream"
    )


def assert_every_line_once(text: str) -> int:
    """The cell's output is line 0 … line N-1 then done N, each once and in order."""
    lines = [line for line in text.splitlines() if not NOTE.match(line)]
    assert lines, "no output"
    last = lines[-1].split()
    assert last[0] == "done", lines[-5:]
    count = int(last[1])
    assert lines[:-1] == [f"line {i}" for i in range(count)], _first_difference(lines, count)
    return count


def _first_difference(lines: list[str], count: int) -> str:
    for i, (got, want) in enumerate(zip(lines, [f"line {i}" for i in range(count)])):
        if got != want:
            return (
                f"line {i}: got {got!r}, expected {want!r} (of {len(lines)} lines, {count} printed)"
            )
    return f"{len(lines) - 1} lines for {count} printed"


def notebook(*sources: str) -> Any:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])


def test_output_during_a_link_cut_arrives_once_in_order(
    jump_spec, topology, remote_tmp, tmp_path, no_leftovers, caplog
):
    """nbclient runs a cell that prints a numbered line every 0.2 s; the bastion's link is
    cut until the host has dropped the silent client (well past the keepalive window), and
    the cell ends while it is still cut: once restored, every line arrives in that cell,
    once, in order, the cell's reply arrives (nbclient goes on), and the kernel's state is
    intact."""
    caplog.set_level(logging.INFO)
    topo, cell = topology.topology, Cell(tmp_path)
    nb = notebook("x = 41", cell.code, "print(x + 1)")
    client = NotebookClient(nb, kernel_name=jump_spec(**FAST), timeout=120)

    async def scenario() -> None:
        run = asyncio.ensure_future(client.async_execute())
        try:
            await wait_for_async(lambda: "line 3" in stream_text(nb.cells[1]), 60, "output")
            topo.cut_link()
            try:
                await wait_for_async(lambda: not relays(remote_tmp), 30, "the host to drop us")
                during = cell.printed()
                await wait_for_async(lambda: cell.printed() >= during + 10, 30, "lines while away")
                cell.end()  # its reply comes while nobody listens, too
                await wait_for_async(cell.ended, 30, "the cell to end")
            finally:
                topo.restore_link()
            await asyncio.wait_for(run, 60)
        finally:
            cell.end()
            if not run.done():
                run.cancel()

    asyncio.run(scenario())
    count = assert_every_line_once(stream_text(nb.cells[1]))
    assert count > 20
    assert stream_text(nb.cells[2]) == "42\n"
    assert "dropped" not in caplog.text


FROZEN_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, kernel_name=sys.argv[2], timeout=120).execute()
nbformat.write(nb, sys.argv[3])
"""


def test_frozen_client_gets_what_was_printed_meanwhile(
    remote_spec, remote_tmp, tmp_path, no_leftovers
):
    """The laptop-sleep case: the process running a notebook is frozen (SIGSTOP) while a
    cell prints, until the host has dropped it and the cell printed on; once resumed
    (SIGCONT) it reconnects by itself, and the notebook gets every line once, in order,
    from the same kernel (its state intact), without a restart."""
    cell = Cell(tmp_path)
    source, result = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(notebook("x = 41", cell.code, "print(x + 1)"), source)
    client = subprocess.Popen(
        [sys.executable, "-c", FROZEN_NOTEBOOK, str(source), remote_spec(**FAST), str(result)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: cell.printed() >= 3, 60, "the cell to print")
        client.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not relays(remote_tmp), 30, "the host to drop the frozen client")
            during = cell.printed()
            wait_for(lambda: cell.printed() >= during + 10, 30, "lines printed while frozen")
        finally:
            client.send_signal(signal.SIGCONT)
        wait_for(lambda: relays(remote_tmp), 30, "the client to reconnect")
        cell.end()
        out, _ = client.communicate(timeout=90)
        assert client.returncode == 0, out
    finally:
        cell.end()
        if client.poll() is None:
            client.kill()
            client.wait(10)
    nb = nbformat.read(result, as_version=4)
    assert assert_every_line_once(stream_text(nb.cells[1])) > 20
    assert stream_text(nb.cells[2]) == "42\n"


HELD_CLIENT = """
import sys, asyncio
from jupyter_client import AsyncKernelManager

async def main():
    km = AsyncKernelManager(kernel_name=sys.argv[1])
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    msg_id = kc.execute(sys.argv[2])
    while True:
        msg = await kc.get_iopub_msg(timeout=60)
        if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
            break
    print(km.provisioner._kernel.kernel_id, flush=True)
    sys.stdin.readline()

asyncio.run(main())
"""


def listed(name: str, kernel_id: str) -> dict[str, Any] | None:
    for kernel in json.loads(rk("ps", name, "--json").stdout):
        if kernel["kernel"] == kernel_id:
            return kernel
    return None


def test_busy_kernel_is_not_an_orphan(remote_spec, remote_tmp, tmp_path, no_leftovers):
    """The client is killed while a cell runs: the kernel stays well past orphan_timeout
    (ps: busy, unattended), and is reaped only once the cell has ended and orphan_timeout
    has passed since then."""
    cell, name = Cell(tmp_path), remote_spec(orphan_timeout=2)
    client = subprocess.Popen(
        [sys.executable, "-c", HELD_CLIENT, name, cell.code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        kernel_id = client.stdout.readline().strip()  # type: ignore[union-attr]
        assert kernel_id, "the client did not start the kernel"
        client.kill()
        client.wait(10)
        unattended = wait_for(
            lambda: (k := listed(name, kernel_id)) and (k["orphaned_for"] or 0) > 5 and k,
            30, "the kernel to be unattended for longer than orphan_timeout",
        )  # fmt: skip
        assert unattended["state"] == "busy", unattended
        [row] = [
            line for line in rk("ps", name).stdout.splitlines() if line.startswith(kernel_id[:8])
        ]
        assert " busy " in row and "kept while busy" in row and " ago " in row, row
        ended = time.monotonic()
        cell.end()
        wait_for(lambda: listed(name, kernel_id) is None, 30, "the idle orphan to be reaped")
        assert time.monotonic() - ended >= 2, "reaped before orphan_timeout passed once idle"
    finally:
        cell.end()
        if client.poll() is None:
            client.kill()
            client.wait(10)


def daemon_rss_kib(remote_tmp: Path) -> int:
    """The resident memory of the remote agent's daemon (which keeps the output)."""
    [line] = [p for p in remote_processes(remote_tmp) if DAEMON_MARK in p]
    status = Path(f"/proc/{line.split()[0]}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]


def test_output_beyond_the_bound_keeps_the_newest(
    jump_spec, topology, remote_tmp, tmp_path, no_leftovers, caplog
):
    """While the link is cut, a cell prints 8 MiB with output_buffer at 1 MiB: once back,
    the client gets the newest lines in order, after a note in that cell saying how many
    messages were dropped; the remote daemon's memory stays bounded."""
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    caplog.set_level(logging.INFO)
    topo = topology.topology
    marker, progress = tmp_path / "stop", tmp_path / "progress"
    count, pad = 8192, 1000
    big = BIG.format(marker=str(marker), progress=str(progress), count=count, pad=pad)
    texts: list[str] = []

    async def scenario() -> None:
        km = AsyncIOLoopKernelManager(kernel_name=jump_spec(**FAST, output_buffer=1))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            cell = kc.execute(big)
            before = daemon_rss_kib(remote_tmp)
            topo.cut_link()
            try:
                await wait_for_async(lambda: not relays(remote_tmp), 30, "the host to drop us")
                marker.touch()  # the big output comes while nobody listens
                await wait_for_async(progress.exists, 60, "the cell to print it all")
                growth = daemon_rss_kib(remote_tmp) - before
            finally:
                topo.restore_link()
            reply = await kc.get_shell_msg(timeout=30)
            assert reply["parent_header"]["msg_id"] == cell, reply
            while True:
                msg = await kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") != cell:
                    continue
                if msg["msg_type"] == "stream":
                    texts.append(msg["content"]["text"])
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            assert growth < 12 * 1024, f"the daemon grew by {growth} KiB for a 1 MiB bound"
        finally:
            marker.touch()
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(scenario())
    text = "".join(texts)
    notes = NOTE.findall(text)
    assert len(notes) == 1 and text.startswith("[jupyter-remote-provisioner]"), text[:300]
    numbers = [int(line.split()[1]) for line in text.splitlines() if line.startswith("line ")]
    assert numbers == list(range(numbers[0], count)), "out of order, repeated or a gap"
    assert text.rstrip().endswith(f"done {count}")
    # every line before the first kept one was dropped (a message may hold part of a line)
    assert int(notes[0]) >= numbers[0], (notes, numbers[0])
    assert 0 < len(numbers) * pad <= (1 << 20), "more kept than the bound"
    assert "dropped while no client was connected" in caplog.text


def test_without_pyzmq_remotely_the_channels_are_forwarded_as_before(
    remote_spec, tmp_path, no_leftovers
):
    """The agent's python cannot import zmq (a host whose python3 has no pyzmq, the kernel
    run by another python through kernel_argv): no keeper; the kernel runs, answers and
    prints through plain forwards, and ps says its state is unknown."""
    from drivers import Driver

    hide = tmp_path / "no-zmq" / "zmq"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('no pyzmq here')\n")
    agent = tmp_path / "python-without-zmq"
    agent.write_text(f'#!/bin/sh\nPYTHONPATH={hide.parent} exec {sys.executable} "$@"\n')
    agent.chmod(0o755)
    kernel = ["env", "-u", "PYTHONPATH", sys.executable, "-m", "ipykernel_launcher", "-f"]
    kernel.append("{connection_file}")
    name = remote_spec(python=str(agent), kernel_argv=kernel)
    driver = Driver("async", name)
    try:
        driver.start()
        assert driver.km.provisioner._kernel.ports.kept is False
        kc = driver.client()
        out: list[str] = []
        reply = kc.execute_interactive(
            "print(6 * 7)",
            timeout=30,
            output_hook=lambda m: out.append(m["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok" and "".join(out) == "42\n"
        [listed_kernel] = json.loads(rk("ps", name, "--json").stdout)
        assert listed_kernel["state"] is None and listed_kernel["kept"] is None
    finally:
        driver.close()


def test_a_cell_run_during_an_outage_runs_once_when_the_link_is_back(
    jump_spec, topology, no_leftovers, caplog
):
    """A cell is run while the bastion's link is cut: it waits, runs once the link is back
    (not twice: its request went both into the dead link and after the resume), and its
    reply and output arrive once."""
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    caplog.set_level(logging.INFO)
    topo = topology.topology

    async def scenario() -> list[dict[str, Any]]:
        km = AsyncIOLoopKernelManager(kernel_name=jump_spec(**FAST))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            await kc.execute_interactive("runs = []", timeout=30)
            topo.cut_link()
            try:
                await wait_for_async(lambda: "Lost the SSH connection" in caplog.text, 15, "loss")
                cell = kc.execute("runs.append(1); print('runs', len(runs))")
            finally:
                topo.restore_link()
            reply = await kc.get_shell_msg(timeout=60)
            assert reply["parent_header"]["msg_id"] == cell and reply["content"]["status"] == "ok"
            seen = []
            while (
                not seen
                or seen[-1]["msg_type"] != "status"
                or seen[-1]["content"]["execution_state"] != "idle"
            ):
                msg = await kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") == cell:
                    seen.append(msg)
            again = await kc.execute_interactive("print(len(runs))", timeout=30,
                                                 output_hook=lambda m: seen.append(m))  # fmt: skip
            assert again["content"]["status"] == "ok"
            return seen
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    seen = asyncio.run(scenario())
    texts = [m["content"]["text"] for m in seen if m["msg_type"] == "stream"]
    assert texts == ["runs 1\n", "1\n"], texts
