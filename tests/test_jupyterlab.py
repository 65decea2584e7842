"""JupyterLab in a real (headless) browser drives a remote kernel through the provisioner.

`jupyter lab` runs in a subprocess with the test session's isolated Jupyter dirs, so its
kernel picker lists the kernelspecs ``remote_spec`` writes. Playwright drives Debian's
Chromium (no Playwright browser download; the machine may have no network, so Chromium's
background traffic is off): pick the remote kernel, run cells, interrupt, restart, shut
down, and see a start failure reported in JupyterLab's "Error Starting Kernel" dialog.
Each step leaves a screenshot in test-results/jupyterlab/.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kernels import remote_kernel_dirs, remote_processes, wait_for
from sshd import free_port

try:
    from playwright.sync_api import expect
except ImportError:  # chromium() fails the test with an install hint
    expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.timeout(240)

START = 60_000  # ms: a kernel start (SSH, agent, forwards) or the page's first load
STEP = 30_000  # ms: anything else

WHO = 'x = 42\nimport os\nprint("REMOTE", os.environ.get("SSH_CONNECTION"))'
SLEEP = 'print("sleeping", flush=True)\nimport time\ntime.sleep(60)'
AFTER_INTERRUPT = 'print("x is", x)'
AFTER_RESTART = 'print("x defined:", "x" in dir())'

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).resolve().parent.parent / "test-results" / "jupyterlab"

_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies (PR_SET_PDEATHSIG)."""
    _LIBC.prctl(1, signal.SIGTERM)


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LabServer:
    """`jupyter lab` in a subprocess on 127.0.0.1, token auth on, serving ``root``.

    It inherits the test session's environment, so it sees the isolated Jupyter dirs and the
    kernelspecs the tests write there.
    """

    def __init__(self, root: Path, state: Path) -> None:
        self.root = root
        self.state = state
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = state / "jupyter-lab.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page_url(self, path: str) -> str:
        return f"{self.url}/{path}?token={self.token}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def _write_settings(self) -> None:
        """User settings that keep JupyterLab from asking about news and updates."""
        d = self.state / "user-settings" / "@jupyterlab" / "apputils-extension"
        d.mkdir(parents=True, exist_ok=True)
        settings = {"fetchNews": "false", "checkForUpdates": False}
        (d / "notification.jupyterlab-settings").write_text(json.dumps(settings))

    def start(self, timeout: float = 60) -> None:
        self._write_settings()
        argv = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.open_browser=False",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.user_settings_dir={self.state / 'user-settings'}",
            f"--LabApp.workspaces_dir={self.state / 'workspaces'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",  # no PyPI queries
            # The server would keep its SSH connection and remote agent for a next kernel
            # (test_persist.py); these tests check that a shutdown leaves nothing remote.
            # Also shows that Jupyter's config reaches every remote kernelspec.
            "--RemoteSSHProvisioner.connection_persist=0",
        ]
        if os.getuid() == 0:
            argv.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=dict(os.environ),
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - fixtures run in the main thread
            )
        try:
            wait_for(self._answers, timeout, "jupyter lab to answer /api/status", interval=0.2)
        except AssertionError as e:
            self.stop()
            pytest.fail(f"{e}:\n{self.log()}")

    def _answers(self) -> bool:
        """Whether /api/status answers (token auth on); fails if the server has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"jupyter lab exited ({self.proc.returncode}):\n{self.log()}")
        try:
            url = f"{self.url}/api/status?token={self.token}"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200 and "started" in json.load(response)
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the server (it shuts its kernels down), SIGKILL its group if it lingers."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its session
        except ProcessLookupError:
            pass


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Debian Chromium under Playwright; fails (never skips) when either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is not installed ({e}): pip install playwright", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    """Numbered screenshots ``NN-step.png`` in test-results/jupyterlab/."""

    def __init__(self, page: Page, first: int) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page = page
        self.n = first

    def __call__(self, step: str) -> Path:
        path = SHOTS / f"{self.n:02d}-{step}.png"
        self.page.screenshot(path=str(path))
        self.n += 1
        return path


def write_notebook(path: Path, cells: list[str]) -> str:
    """An .ipynb with ``cells`` as code cells and no kernel metadata; returns its file name."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbformat.write(nb, path)
    return path.name


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, kernels_dir: Path) -> Iterator[LabServer]:
    server = LabServer(tmp_path_factory.mktemp("lab-root"), tmp_path_factory.mktemp("lab"))
    server.start()
    try:
        yield server
    finally:
        port = server.port
        server.stop()
        wait_for(lambda: not listening(port), 10, f"jupyter lab to stop listening on {port}")


@pytest.fixture
def page(lab: LabServer, no_leftovers):
    """A fresh headless Chromium page. It is set up after ``no_leftovers`` and closed before
    its check, so Playwright's own threads in this process do not count as leftovers."""
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(STEP)
        expect.set_options(timeout=STEP)  # assertions wait up to STEP, not Playwright's 5 s
        try:
            yield context.new_page()
        finally:
            expect.set_options(timeout=None)
            context.close()
            print(f"jupyter lab's log (tail):\n{lab.log()}")  # shown if the test failed


def remote_side_clean(remote_tmp: Path) -> None:
    """Wait until no process started through the test sshd and no remote kernel dir is left
    (the kernel ran under the `jupyter lab` subprocess, so this process's own listeners and
    threads say nothing about it; ``no_leftovers`` checks those after the browser closed)."""

    def left() -> dict[str, list[str]]:
        items = {
            "remote processes": remote_processes(remote_tmp),
            "remote kernel dirs": remote_kernel_dirs(remote_tmp),
        }
        return {k: v for k, v in items.items() if v}

    try:
        wait_for(lambda: not left(), 20, "the remote kernel to be gone")
    except AssertionError:
        raise AssertionError(f"left behind: {left()}") from None


def open_and_pick(page, lab: LabServer, notebook: str, kernel: str, shot: Shots) -> None:
    """Open ``notebook`` in JupyterLab and choose ``kernel`` in its "Select Kernel" dialog."""
    # A workspace of its own, so JupyterLab restores no notebook an earlier test opened.
    workspace = Path(notebook).stem
    page.goto(lab.page_url(f"lab/workspaces/{workspace}/tree/{notebook}"))
    dialog = page.locator(".jp-Dialog")
    expect(dialog.get_by_text("Select Kernel", exact=True)).to_be_visible(timeout=START)
    expect(dialog).to_contain_text(f'Select kernel for: "{Path(notebook).name}"')
    dialog.locator("select").select_option(label=kernel)
    shot("kernel-picker")
    dialog.get_by_role("button", name="Select Kernel").click()


def kernel_status(page):
    return page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")


def run_cell(page, index: int):
    """Put the cursor in code cell ``index`` and press Shift+Enter; return the cell."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    return cell


def kernel_menu(page, item: str | re.Pattern[str]) -> None:
    """Click Kernel > ``item`` in the menu bar."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Kernel$")).click()
    page.get_by_role("menuitem", name=item).click()


def test_lab_runs_interrupts_restarts_and_shuts_down_remote_kernel(
    lab: LabServer, page, remote_spec, ssh_env, remote_tmp: Path
):
    spec = remote_spec()
    shot = Shots(page, 1)
    notebook = write_notebook(
        lab.root / f"{spec}.ipynb", [WHO, SLEEP, AFTER_INTERRUPT, AFTER_RESTART]
    )
    open_and_pick(page, lab, notebook, spec, shot)
    status = kernel_status(page)
    expect(page.locator(".jp-NotebookPanel .jp-KernelName")).to_have_text(spec, timeout=START)
    expect(status).to_have_attribute("data-status", "idle", timeout=START)

    # Run: the kernel is in an SSH session of the test sshd.
    cell = run_cell(page, 0)
    sshd_side = f"127.0.0.1 {ssh_env.port}"
    output = cell.locator(".jp-OutputArea-output")
    expect(output).to_contain_text(re.compile(rf"REMOTE 127\.0\.0\.1 \d+ {sshd_side}"))
    expect(status).to_have_attribute("data-status", "idle")
    shot("remote-output")

    # Interrupt a sleeping cell; like a user, interrupt again if the first one was too early.
    cell = run_cell(page, 1)
    expect(cell.locator(".jp-OutputArea-output").first).to_contain_text("sleeping")
    expect(status).to_have_attribute("data-status", "busy")
    shot("sleeping")
    error = cell.locator(".jp-OutputArea-output", has_text="KeyboardInterrupt")
    for attempt in range(3):
        kernel_menu(page, re.compile(r"^Interrupt Kernel"))
        try:
            expect(error).to_be_visible(timeout=10_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    expect(status).to_have_attribute("data-status", "idle")
    cell = run_cell(page, 2)
    expect(cell.locator(".jp-OutputArea-output")).to_have_text(re.compile(r"^\s*x is 42\s*$"))
    shot("interrupted-state-kept")

    # Restart: confirm the dialog; the state is gone.
    kernel_menu(page, re.compile(r"^Restart Kernel…"))
    dialog = page.locator(".jp-Dialog")
    expect(dialog.get_by_text("Restart Kernel?")).to_be_visible()
    shot("restart-dialog")
    dialog.get_by_role("button", name="Confirm Kernel Restart").click()
    expect(dialog).to_have_count(0)
    expect(status).to_have_attribute("data-status", "idle", timeout=START)
    # JupyterLab holds the cell until the new kernel is connected; it counts from 1 again.
    cell = run_cell(page, 3)
    output = cell.locator(".jp-OutputArea-output")
    expect(output).to_have_text(re.compile(r"^\s*x defined: False\s*$"), timeout=START)
    expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:")
    shot("restarted-state-cleared")

    # Shut down: the notebook has no kernel, and nothing is left on the remote side.
    kernel_menu(page, re.compile(r"^Shut Down Kernel"))
    expect(page.locator(".jp-NotebookPanel .jp-KernelName")).to_have_text("No Kernel")
    shot("shut-down")
    remote_side_clean(remote_tmp)


def test_lab_notebook_reads_its_uploaded_data(
    lab: LabServer, page, remote_spec, remote_tmp: Path, tmp_path: Path
):
    """The user story of `upload`: a notebook next to data.csv, the kernel elsewhere."""
    remote_work = tmp_path / "remote-work"
    remote_work.mkdir()
    spec = remote_spec(upload=["data.csv"], cwd=str(remote_work))
    project = lab.root / f"project-{spec}"
    project.mkdir()
    (project / "data.csv").write_text("city,temp\nOslo,3\n")
    read = 'import os\nprint(os.getcwd(), open("data.csv").read().splitlines()[1])'
    write_notebook(project / "analysis.ipynb", [read])
    shot = Shots(page, 21)
    open_and_pick(page, lab, f"{project.name}/analysis.ipynb", spec, shot)
    status = kernel_status(page)
    expect(status).to_have_attribute("data-status", "idle", timeout=START)
    cell = run_cell(page, 0)
    expect(cell.locator(".jp-OutputArea-output")).to_have_text(f"{remote_work} Oslo,3\n")
    shot("uploaded-data-read")
    kernel_menu(page, re.compile(r"^Shut Down Kernel"))
    expect(page.locator(".jp-NotebookPanel .jp-KernelName")).to_have_text("No Kernel")
    remote_side_clean(remote_tmp)


def test_lab_shows_start_failure(lab: LabServer, page, remote_spec, remote_tmp: Path):
    port = free_port()
    spec = remote_spec(host=f"127.0.0.1:{port}")
    shot = Shots(page, 11)
    notebook = write_notebook(lab.root / f"{spec}.ipynb", ['print("never runs")'])
    open_and_pick(page, lab, notebook, spec, shot)
    dialog = page.locator(".jp-Dialog", has_text="Error Starting Kernel")
    expect(dialog).to_be_visible(timeout=START)
    expect(dialog.locator(".jp-Dialog-body")).to_have_text(
        f"host 127.0.0.1:{port} refused the SSH connection; check that sshd runs there and "
        f"listens on port {port}"
    )  # the whole body: one line that says what to do, no traceback
    shot("start-error")
    dialog.get_by_role("button", name="Ok").click()
    expect(dialog).to_have_count(0)
    remote_side_clean(remote_tmp)


def test_lab_runs_a_kernel_on_a_slurm_node(lab: LabServer, page, slurm, slurm_spec):
    """Pick a Slurm kernelspec: the kernel runs in its own job on a compute node, and shutting
    it down from the Kernel menu ends the job."""
    spec = slurm_spec(slurm={"gpus": 1})
    shot = Shots(page, 31)
    where = "import os, socket\nprint(os.environ['SLURM_JOB_ID'], socket.gethostname())"
    notebook = write_notebook(lab.root / f"{spec}.ipynb", [where])
    open_and_pick(page, lab, notebook, spec, shot)
    expect(kernel_status(page)).to_have_attribute("data-status", "idle", timeout=START)
    (job,) = [j for j in slurm.squeue() if j["name"].startswith("jrp-")]
    cell = run_cell(page, 0)
    expect(cell.locator(".jp-OutputArea-output")).to_have_text(f"{job['id']} {job['node']}\n")
    shot("ran-on-a-node")
    kernel_menu(page, re.compile(r"^Shut Down Kernel"))
    expect(page.locator(".jp-NotebookPanel .jp-KernelName")).to_have_text("No Kernel")
    wait_for(lambda: not slurm.squeue(), 20, "the kernel's job to end")
