"""Nothing lost while away, seen in JupyterLab in headless Chromium: a cell printing through a
cut link shows every line once, in order, and completes; `jupyter lab` killed (`kill -9`)
and started again gives the reopened notebook its old kernel, its variables and what it
printed meanwhile.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from test_jupyterlab import (
    START,
    STEP,
    LabServer,
    Shots,
    chromium,
    expect,
    kernel_menu,
    kernel_status,
    lab,  # noqa: F401 - the module's server fixture
    open_and_pick,
    page,  # noqa: F401 - the page fixture
    remote_side_clean,
    run_cell,
    write_notebook,
)
from test_output_kept import Cell, assert_every_line_once

from kernels import FAST, relays, remote_kernels, wait_for

pytestmark = pytest.mark.timeout(300)


def cell_text(cell) -> str:
    return "\n".join(cell.locator(".jp-OutputArea-output").all_inner_texts())


def start_printing(page, server: LabServer, notebook: str, spec: str, shot: Shots):  # noqa: F811
    """Open the notebook (x = 41, the numbered cell, …) with ``spec``, run its first cell,
    start the numbered one and wait for its output; returns that cell."""
    open_and_pick(page, server, notebook, spec, shot)
    status = kernel_status(page)
    expect(status).to_have_attribute("data-status", "idle", timeout=START)
    run_cell(page, 0)
    expect(status).to_have_attribute("data-status", "idle")
    cell = run_cell(page, 1)
    expect(cell.locator(".jp-OutputArea-output").first).to_contain_text("line 3")
    return cell


def test_lab_output_during_a_link_cut_arrives_in_its_cell(
    lab: LabServer,  # noqa: F811
    page,  # noqa: F811
    jump_spec,
    topology,
    remote_tmp: Path,
    tmp_path: Path,
):
    """The bastion's link is cut while a cell prints a numbered line every 0.2 s, until the
    host has dropped the silent client, and the cell ends during the cut: once the link is
    back, the cell shows every line once and in order, it completes ([n], not [*]), and the
    kernel's state is there for the next cell."""
    topo, work = topology.topology, Cell(tmp_path)
    spec = jump_spec(**FAST)
    shot = Shots(page, 40)
    notebook = write_notebook(lab.root / f"{spec}.ipynb", ["x = 41", work.code, "print(x + 1)"])
    cell = start_printing(page, lab, notebook, spec, shot)
    try:
        topo.cut_link()
        wait_for(lambda: not relays(remote_tmp), 30, "the host to drop the silent client")
        during = work.printed()
        wait_for(lambda: work.printed() >= during + 10, 30, "lines printed while away")
        work.end()
        wait_for(work.ended, 30, "the cell to end during the cut")
        shot("link-cut")
    finally:
        topo.restore_link()
    expect(cell.locator(".jp-OutputArea-output").first).to_contain_text(
        re.compile(r"done \d+"), timeout=START
    )
    expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]:"))
    assert assert_every_line_once(cell_text(cell)) > 20
    shot("every-line")
    last = run_cell(page, 2)
    expect(last.locator(".jp-OutputArea-output")).to_have_text(re.compile(r"^\s*42\s*$"))
    kernel_menu(page, re.compile(r"^Shut Down Kernel"))
    expect(page.locator(".jp-NotebookPanel .jp-KernelName")).to_have_text("No Kernel")
    remote_side_clean(remote_tmp)


def test_lab_killed_and_restarted_gives_the_notebook_its_kernel(
    remote_spec, remote_tmp: Path, tmp_path: Path, no_leftovers
):
    """`jupyter lab` is killed with `kill -9` while a cell prints; the cell prints on and
    ends with no server there. A new `jupyter lab` opens the notebook, the user picks the
    same kernel: the first cell run shows what was printed meanwhile and the old variable."""
    work = Cell(tmp_path)
    spec = remote_spec(orphan_timeout=600)
    root = tmp_path / "root"
    root.mkdir()
    first, second = LabServer(root, tmp_path / "state1"), LabServer(root, tmp_path / "state2")
    notebook = write_notebook(root / "analysis.ipynb", ["x = 41", work.code, "print(x + 1)"])
    try:
        with chromium() as browser:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(STEP)
            expect.set_options(timeout=STEP)
            try:
                page_ = context.new_page()
                shot = Shots(page_, 50)
                for server in (first, second):
                    server.state.mkdir()
                first.start()
                start_printing(page_, first, notebook, spec, shot)
                [pid] = remote_kernels(remote_tmp)
                assert first.proc is not None
                os.killpg(first.proc.pid, signal.SIGKILL)
                first.proc.wait(10)
                first.proc = None
                at_kill = work.printed()
                wait_for(lambda: work.printed() >= at_kill + 5, 30, "lines with no server")
                work.end()
                wait_for(work.ended, 30, "the cell to end with no server")

                second.start()
                open_and_pick(page_, second, notebook, spec, shot)
                status = kernel_status(page_)
                expect(status).to_have_attribute("data-status", "idle", timeout=START)
                last = run_cell(page_, 2)
                expect(last.locator(".jp-InputPrompt")).to_have_text(
                    re.compile(r"\[\d+\]:"), timeout=START
                )
                expect(last.locator(".jp-OutputArea-output").last).to_contain_text("42")
                shot("reattached")
                lines = [line for line in cell_text(last).splitlines() if line.strip()]
                assert lines[0].startswith("[jupyter-remote-provisioner] output of a cell")
                assert lines[-1] == "42", "not the same kernel: its variables are gone"
                numbers = [int(line.split()[1]) for line in lines[1:-1]]
                assert lines[-2].startswith("done") and numbers[0] <= at_kill + 1, lines[:3]
                assert numbers[:-1] == list(range(numbers[0], numbers[-1])), lines
                assert remote_kernels(remote_tmp) == [pid]
            finally:
                expect.set_options(timeout=None)
                context.close()
    finally:
        work.end()
        first.stop()
        second.stop()
    remote_side_clean(remote_tmp)
