"""The remote kernel driven end to end by the clients people use on notebooks and consoles.

``jupyter execute``, papermill (command and API), nbclient and ``jupyter console`` (in tmux)
each run a small notebook or line on a remote kernelspec; the outputs must come from a kernel
in a session of the test sshd. Missing clients fail with how to install them; never skip.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from kernels import wait_for
from notebooks import (
    WHO,
    all_stdout,
    assert_ran_through,
    cell_errors,
    code,
    errors_of,
    read_notebook,
    script,
    stdout_of,
    write_notebook,
)

pytestmark = pytest.mark.timeout(180)

RUN_TIMEOUT = 90  # a whole client subprocess: start, a few cells, shutdown


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a client to completion (bounded); fail with its output if it fails."""
    res = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert res.returncode == 0, (
        f"{shlex.join(argv)} exited with {res.returncode}\n"
        f"--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    )
    return res


# --- jupyter execute ---------------------------------------------------------------------


def test_jupyter_execute(tmp_path, remote_spec, ssh_env, no_leftovers):
    spec = remote_spec()
    nb_path = write_notebook(
        tmp_path / "notebook.ipynb", code("x = 6 * 7"), code(WHO), code("print(x)")
    )
    script("jupyter-execute")  # what `jupyter execute` runs; fail clearly if it is missing
    run(
        [
            script("jupyter"), "execute", f"--kernel_name={spec}", str(nb_path),
            "--output=out", "--timeout=60", "--startup_timeout=60",
        ],
        tmp_path,
    )  # fmt: skip
    nb = read_notebook(tmp_path / "out.ipynb")
    assert_ran_through(stdout_of(nb.cells[1]), ssh_env)
    assert stdout_of(nb.cells[2]) == "42\n"
    assert [c.execution_count for c in nb.cells] == [1, 2, 3]
    assert not errors_of(nb)


# --- papermill -----------------------------------------------------------------------------

PARAMETERS = 'greeting = "hi"\nn = 1'
GREET = "print(greeting * n)"


def _papermill_notebook(path: Path) -> Path:
    return write_notebook(path, code(PARAMETERS, "parameters"), code(GREET), code(WHO))


def _assert_parameterised(nb: nbformat.NotebookNode, ssh_env) -> None:
    """papermill injected greeting="hello", n=3 after the parameters cell; the kernel
    computed with them remotely."""
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags[:2] == [["parameters"], ["injected-parameters"]], tags
    injected = nb.cells[1].source
    assert 'greeting = "hello"' in injected and "n = 3" in injected, injected
    assert stdout_of(nb.cells[2]) == "hellohellohello\n"
    assert_ran_through(stdout_of(nb.cells[3]), ssh_env)
    assert nb.metadata.papermill.parameters == {"greeting": "hello", "n": 3}
    assert not nb.metadata.papermill.exception
    assert not errors_of(nb)


def test_papermill_command(tmp_path, remote_spec, ssh_env, no_leftovers):
    spec = remote_spec()
    src = _papermill_notebook(tmp_path / "in.ipynb")
    out = tmp_path / "out.ipynb"
    run(
        [
            script("papermill"), str(src), str(out), "-k", spec,
            "-p", "greeting", "hello", "-p", "n", "3",
            "--no-progress-bar", "--start-timeout", "60", "--execution-timeout", "60",
        ],
        tmp_path,
    )  # fmt: skip
    _assert_parameterised(read_notebook(out), ssh_env)


def test_papermill_api(tmp_path, remote_spec, ssh_env, no_leftovers):
    try:
        import papermill
    except ImportError as e:
        pytest.fail(f"papermill is not installed ({e}); run pip install -e '.[test]'")
    spec = remote_spec()
    src = _papermill_notebook(tmp_path / "in.ipynb")
    out = tmp_path / "out.ipynb"
    returned = papermill.execute_notebook(
        str(src),
        str(out),
        parameters={"greeting": "hello", "n": 3},
        kernel_name=spec,
        progress_bar=False,
        start_timeout=60,
        execution_timeout=60,
    )
    _assert_parameterised(returned, ssh_env)
    _assert_parameterised(read_notebook(out), ssh_env)


# --- nbclient --------------------------------------------------------------------------------


def test_nbclient_executes_remotely(tmp_path, remote_spec, ssh_env, no_leftovers):
    nb = nbformat.read(
        write_notebook(tmp_path / "nb.ipynb", code("x = 6 * 7"), code(WHO), code("print(x)")),
        as_version=4,
    )
    NotebookClient(nb, kernel_name=remote_spec(), timeout=60).execute()
    assert_ran_through(stdout_of(nb.cells[1]), ssh_env)
    assert stdout_of(nb.cells[2]) == "42\n"
    assert [c.execution_count for c in nb.cells] == [1, 2, 3]


ERROR_CELLS = (WHO, 'raise ValueError("boom")', 'print("after")')


def _run_failing(kernel_name: str, **options) -> tuple[nbformat.NotebookNode, str | None]:
    """Execute WHO, a raising cell and a print; return the notebook and the error raised."""
    nb = nbformat.v4.new_notebook(cells=[code(c) for c in ERROR_CELLS])
    try:
        NotebookClient(nb, kernel_name=kernel_name, timeout=60, **options).execute()
    except CellExecutionError as e:
        return nb, f"{e.ename}: {e.evalue}"
    return nb, None


def _error_shape(nb: nbformat.NotebookNode) -> list[tuple]:
    """What a user sees of each cell after WHO: its count, stdout and errors."""
    shape = []
    for cell in nb.cells[1:]:
        errors = [(o["ename"], o["evalue"], bool(o["traceback"])) for o in cell_errors(cell)]
        shape.append((cell.execution_count, stdout_of(cell), errors))
    return shape


def test_nbclient_errors_like_a_local_kernel(
    tmp_path, monkeypatch, remote_spec, ssh_env, no_leftovers
):
    """A raising cell gives the same error output and CellExecutionError as a local kernel
    (the native python3 kernel): execution stops there, or goes on with allow_errors."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # the local kernel's profile
    spec = remote_spec()
    remote, raised = _run_failing(spec)
    assert raised == "ValueError: boom"
    assert_ran_through(stdout_of(remote.cells[0]), ssh_env)
    assert _error_shape(remote) == [(2, "", [("ValueError", "boom", True)]), (None, "", [])]
    tb = "\n".join(errors_of(remote)[0]["traceback"])
    assert "ValueError" in tb and "boom" in tb

    local, local_raised = _run_failing("python3")
    local_who = stdout_of(local.cells[0]).strip()
    assert not local_who.endswith(f"{ssh_env.host} {ssh_env.port}"), "python3 runs locally"
    assert (raised, _error_shape(remote)) == (local_raised, _error_shape(local))

    remote, raised = _run_failing(remote_spec(), allow_errors=True)
    assert raised is None
    assert _error_shape(remote) == [(2, "", [("ValueError", "boom", True)]), (3, "after\n", [])]
    assert_ran_through(all_stdout(remote), ssh_env)


# --- jupyter console in tmux ---------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket name, no config file) with one session."""

    def __init__(self, tmux: str) -> None:
        self.tmux = tmux
        self.socket = f"jrp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.session = "console"
        self.socket_path: str | None = None

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.tmux, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=check,
        )

    def start(self, command: str, cwd: Path) -> None:
        self(
            "new-session", "-d", "-s", self.session, "-x", "200", "-y", "50", "-c", str(cwd),
            command,
        )  # fmt: skip
        self.socket_path = self("display-message", "-p", "#{socket_path}").stdout.strip()

    def screen(self) -> str:
        res = self("capture-pane", "-p", "-J", "-t", self.session, check=False)
        return res.stdout

    def type_line(self, line: str) -> None:
        self("send-keys", "-t", self.session, "-l", line)
        self("send-keys", "-t", self.session, "Enter")

    def has_session(self) -> bool:
        return self("has-session", "-t", self.session, check=False).returncode == 0

    def kill_server(self) -> None:
        """Stop the server (and so anything still in its panes); remove its socket file."""
        self("kill-server", check=False)
        if self.socket_path:
            Path(self.socket_path).unlink(missing_ok=True)


@pytest.fixture
def tmux(no_leftovers) -> Iterator[Tmux]:
    """A private tmux server, killed on teardown (before the leftover check)."""
    found = shutil.which("tmux")
    if found is None:
        pytest.fail("tmux is not installed; install it (apt-get install tmux) to run this test")
    t = Tmux(found)
    yield t
    t.kill_server()


def _wait_screen(tmux: Tmux, text: str, timeout: float, what: str) -> str:
    try:
        wait_for(lambda: text in tmux.screen(), timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the console shows:\n{tmux.screen()}") from None
    return tmux.screen()


def test_jupyter_console_in_tmux(tmp_path, remote_spec, ssh_env, tmux, no_leftovers):
    script("jupyter-console")  # `jupyter console` runs it; fail now, not at the first prompt
    spec = remote_spec()
    status = tmp_path / "status"
    console = [
        script("jupyter"), "console", "--kernel", spec,
        "--ZMQTerminalInteractiveShell.simple_prompt=True",
    ]  # fmt: skip
    # The pane's shell gets the tmux server's environment, so the test's Jupyter dirs (where
    # the spec is) are passed explicitly; the exit status lands in a file once it has exited.
    # IPython's profile and history go to tmp_path too, not the user's ~/.ipython.
    jupyter_env = {k: v for k, v in os.environ.items() if k.startswith("JUPYTER_")}
    assert "JUPYTER_PATH" in jupyter_env
    jupyter_env["IPYTHONDIR"] = str(tmp_path / "ipython")
    wrapper = tmp_path / "console.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(jupyter_env.items()))
        + f"{shlex.join(console)}\n"
        + f"echo $? > {shlex.quote(str(status))}.part && mv {shlex.quote(str(status))}.part "
        + f"{shlex.quote(str(status))}\n"
    )
    wrapper.chmod(0o755)
    tmux.start(str(wrapper), tmp_path)

    _wait_screen(tmux, "In [1]:", 60, "the console's first prompt")
    tmux.type_line(WHO.replace("\n", "; "))
    screen = _wait_screen(tmux, "In [2]:", 30, "the console to run the line")
    assert_ran_through(screen, ssh_env)

    tmux.type_line("exit")
    try:
        wait_for(status.exists, 30, "jupyter console to exit")
    except AssertionError as e:
        raise AssertionError(f"{e}; the console shows:\n{tmux.screen()}") from None
    assert status.read_text().strip() == "0", "jupyter console exited with an error"
    wait_for(lambda: not tmux.has_session(), 10, "the tmux session to end")
