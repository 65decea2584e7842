"""Files where the kernel is: pre-launch ``upload`` and the ``path_map`` working directory.

The remote host is this machine, so a kernel could read the local file by accident; each
test therefore runs the kernel in a remote directory other than the notebook's and checks
the copy it reads.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from drivers import Driver
from kernels import rk, run_cell
from notebooks import code, read_notebook, script, stdout_of, write_notebook

pytestmark = pytest.mark.timeout(120)

READ_DATA = """import csv, os
print(os.getcwd())
print(list(csv.reader(open("data.csv"))))
print(open("inputs/extra.txt").read())"""


def laptop_project(root: Path) -> Path:
    """A notebook directory with the data its notebook reads by relative path."""
    root.mkdir(parents=True)
    (root / "data.csv").write_text("city,temp\nOslo,3\n")
    (root / "inputs").mkdir()
    (root / "inputs" / "extra.txt").write_text("extra")
    (root / "inputs" / "__pycache__").mkdir()
    (root / "inputs" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    return root


def test_jupyter_execute_reads_files_uploaded_before_launch(tmp_path, remote_spec, no_leftovers):
    notebook_dir = laptop_project(tmp_path / "laptop")
    remote_work = tmp_path / "gpu-work"
    remote_work.mkdir()
    spec = remote_spec(upload=["data.csv", "inputs"], cwd=str(remote_work))
    nb_path = write_notebook(notebook_dir / "analysis.ipynb", code(READ_DATA))
    proc = subprocess.run(
        [script("jupyter"), "execute", f"--kernel_name={spec}", str(nb_path), "--output=out",
         "--timeout=60", "--startup_timeout=60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = stdout_of(read_notebook(notebook_dir / "out.ipynb").cells[0])
    assert printed == f"{remote_work}\n[['city', 'temp'], ['Oslo', '3']]\nextra\n"
    assert sorted(os.listdir(remote_work / "inputs")) == ["extra.txt"]  # __pycache__ skipped


def test_restart_uploads_what_changed(tmp_path, remote_spec, no_leftovers):
    notebook_dir = laptop_project(tmp_path / "laptop")
    remote_work = tmp_path / "gpu-work"
    remote_work.mkdir()
    driver = Driver("async", remote_spec(upload=["data.csv", "inputs"], cwd=str(remote_work)))
    try:
        driver.start(cwd=str(notebook_dir))
        untouched = (remote_work / "inputs" / "extra.txt").stat().st_ino
        (notebook_dir / "data.csv").write_text("city,temp\nLima,19\n")
        driver.restart()
        out, reply = run_cell(driver.client(), READ_DATA)
        assert reply["status"] == "ok", reply
        assert out.splitlines()[1] == "[['city', 'temp'], ['Lima', '19']]"
        assert (remote_work / "inputs" / "extra.txt").stat().st_ino == untouched  # not re-sent
    finally:
        driver.close()


def test_path_map_runs_the_notebook_in_the_matching_remote_directory(
    tmp_path, remote_spec, remote_session_env, no_leftovers
):
    project = tmp_path / "work" / "proj"
    (project / "nbs").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "x.csv").write_text("1,2\n")
    remote_root = tmp_path / "remote" / "projects" / "proj"  # does not exist yet
    spec = remote_spec(path_map={str(project): str(remote_root)}, upload=["../data/x.csv"])
    driver = Driver("blocking", spec)
    try:
        driver.start(cwd=str(project / "nbs"))
        out, _ = run_cell(
            driver.client(), 'import os; print(os.getcwd()); print(open("../data/x.csv").read())'
        )
        assert out == f"{remote_root / 'nbs'}\n1,2\n\n"
    finally:
        driver.close()
    # a notebook outside the mapped directory
    elsewhere = Driver("blocking", remote_spec(path_map={str(project): str(remote_root)}))
    try:
        elsewhere.start(cwd=str(tmp_path))
        out, _ = run_cell(elsewhere.client(), "import os; print(os.getcwd())")
        assert out == f"{remote_session_env['HOME']}\n"  # `cwd` is unset: the remote home
    finally:
        elsewhere.close()


def test_show_tells_where_the_kernel_works(tmp_path, ssh_env):
    project = tmp_path / "proj"
    (project / "nbs").mkdir(parents=True)
    rk("add", "--name", "Mapped", "--endpoint", ssh_env.alias, "--ssh-config",
       str(ssh_env.ssh_config), "--path-map", f"{project}=~/projects/proj", "--upload",
       "data.csv", "--replace")  # fmt: skip
    try:
        shown = rk("show", "Mapped", cwd=project / "nbs").stdout.splitlines()
        at = shown.index("remote cwd: ~ (remote home)")
        assert shown[at + 1 :] == [
            f"  for notebooks under {project}: the same place under ~/projects/proj",
            f"  for a notebook in {project / 'nbs'}: ~/projects/proj/nbs",
            "uploaded before each start: data.csv (from the notebook's directory)",
        ]
    finally:
        rk("delete", "Mapped")
