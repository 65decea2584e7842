"""`remote_kernel sync`: push, pull, re-sync, exclusions and failures, against the real sshd.

The remote host is this machine (through sshd, or through the bastion namespace), so the
tests look at the remote side directly on disk. The failure cases build the conditions for
real: a small tmpfs for a full disk, a read-only bind mount, an immutable directory (root).
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_remote_provisioner.remote.files import TEMP_PREFIX

from kernels import one_line_error, rk, wait_for

pytestmark = pytest.mark.timeout(120)


def make_tree(root: Path) -> dict[str, bytes]:
    """A project with files to copy and the kinds of things sync skips; returns what it
    should copy by default (relative path -> content)."""
    wanted = {
        "train.py": b"print('train')\n",
        "run.sh": b"#!/bin/sh\necho run\n",
        "data/train.csv": b"a,b\n1,2\n" * 1000,
        "data/nested/deep.txt": b"deep",
        "secret.key": b"private",
    }
    skipped = {
        ".git/HEAD": b"ref: refs/heads/main\n",
        "__pycache__/train.cpython-311.pyc": b"\0",
        ".ipynb_checkpoints/nb-checkpoint.ipynb": b"{}",
        "data/__pycache__/x.pyc": b"\0",
        ".venv/pyvenv.cfg": b"home = /usr\n",
        ".venv/lib/site.py": b"",
        "conda_env/conda-meta/history": b"",
    }
    for rel, content in {**wanted, **skipped}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "run.sh").chmod(0o755)
    (root / "secret.key").chmod(0o600)
    (root / "empty_dir").mkdir()
    return wanted


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(f"{TEMP_PREFIX}*")]


@pytest.fixture
def spec(remote_spec):
    return remote_spec()


def test_push_copies_a_tree_then_only_what_changed(spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "project", tmp_path / "remote" / "project"
    local.mkdir()
    wanted = make_tree(local)
    (local / "model.ckpt").write_bytes(b"weights")

    first = rk("sync", spec, str(local), str(remote), "--exclude", "*.ckpt")
    assert sum(map(len, wanted.values())) == 8045
    assert first.stdout.startswith(f"copied 5 files (7.9 KiB) to testhost:{remote} in ")
    assert files_under(remote) == wanted
    assert (remote / "empty_dir").is_dir()
    for rel in wanted:  # permissions and modification times are kept
        there, here = (remote / rel).stat(), (local / rel).stat()
        assert stat.S_IMODE(there.st_mode) == stat.S_IMODE(here.st_mode), rel
        assert there.st_mtime_ns == here.st_mtime_ns, rel

    inodes = {rel: (remote / rel).stat().st_ino for rel in wanted}
    again = rk("sync", spec, str(local), str(remote), "--exclude", "*.ckpt")
    assert again.stdout.strip() == f"testhost:{remote} is up to date: 5 files unchanged"
    assert {rel: (remote / rel).stat().st_ino for rel in wanted} == inodes  # not rewritten

    (local / "train.py").write_bytes(b"print('train v2')\n")  # new size
    os.utime(local / "run.sh", ns=(10**18, 10**18))  # same size, new time
    third = rk("sync", spec, str(local), str(remote), "--exclude", "*.ckpt")
    assert third.stdout.startswith("copied 2 files ("), third.stdout
    assert third.stdout.strip().endswith("; 3 unchanged")
    assert (remote / "train.py").read_bytes() == b"print('train v2')\n"
    assert (remote / "run.sh").stat().st_mtime_ns == 10**18
    assert not temp_files(remote)


def test_progress_bar_on_a_terminal(spec, tmp_path, no_leftovers):
    """stderr on a terminal gets a progress bar (bytes, rate, files), erased at the end."""
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(64 << 20)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jupyter_remote_provisioner", "sync", spec, str(big),
             str(tmp_path / "remote") + "/"],
            stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60, check=False,
        )  # fmt: skip
        os.close(follower)
        follower = -1
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once everything written has been read
            while chunk := os.read(leader, 65536):
                drawn += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0 and proc.stdout.startswith("copied 1 file (64.0 MiB) to ")
    *_, last, erased, end = drawn.decode().split("\r")  # frames, then spaces over the last
    assert re.fullmatch(r"100% \[#+\] 64\.0 MiB / 64\.0 MiB  [\d.]+ [KMG]iB/s  1/1 file *", last)
    assert erased == " " * len(last) and end == ""  # erased: the summary stands alone


def test_links_are_followed_and_broken_ones_named(spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "project", tmp_path / "remote"
    (local / "real").mkdir(parents=True)
    (local / "real" / "data.csv").write_text("1,2\n")
    (local / "linked.csv").symlink_to(local / "real" / "data.csv")
    (local / "linked_dir").symlink_to(local / "real")
    (local / "loop").symlink_to(local)
    (local / "broken").symlink_to(tmp_path / "nowhere")
    done = rk("sync", spec, str(local), str(remote))
    assert files_under(remote) == {
        "linked.csv": b"1,2\n", "linked_dir/data.csv": b"1,2\n", "real/data.csv": b"1,2\n",
    }  # fmt: skip
    assert not (remote / "linked.csv").is_symlink()
    assert done.stderr == (
        "skipped 2 that are not regular files or directories (broken links, sockets, loops): "
        "broken, loop\n"
    )


def test_default_excludes_can_be_turned_off(spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "project", tmp_path / "remote"
    local.mkdir()
    make_tree(local)
    rk("sync", spec, str(local), str(remote), "--no-default-excludes")
    assert (remote / ".git" / "HEAD").is_file()
    assert (remote / ".venv" / "pyvenv.cfg").is_file()
    assert (remote / "conda_env" / "conda-meta" / "history").is_file()


def test_checksum_finds_a_change_size_and_time_miss(spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "a.txt", tmp_path / "remote" / "a.txt"
    local.write_bytes(b"version 1")
    rk("sync", spec, str(local), str(remote))
    local.write_bytes(b"version 2")  # same size...
    os.utime(local, ns=(remote.stat().st_mtime_ns,) * 2)  # ...and the same time
    assert "is up to date" in rk("sync", spec, str(local), str(remote)).stdout
    assert remote.read_bytes() == b"version 1"
    assert rk("sync", spec, str(local), str(remote), "--checksum").stdout.startswith(
        "copied 1 file (9 B)"
    )
    assert remote.read_bytes() == b"version 2"
    assert "is up to date" in rk("sync", spec, str(local), str(remote), "--checksum").stdout


def test_pull_copies_back_and_resyncs_as_a_no_op(spec, tmp_path, no_leftovers):
    remote, local = tmp_path / "remote", tmp_path / "pulled"
    remote.mkdir()
    wanted = make_tree(remote)
    pulled = rk("sync", spec, str(remote), str(local), "--pull")
    assert pulled.stdout.startswith("copied 5 files (") and f" to {local} in " in pulled.stdout
    assert files_under(local) == wanted
    assert stat.S_IMODE((local / "run.sh").stat().st_mode) == 0o755
    again = rk("sync", spec, str(remote), str(local), "--pull")
    assert again.stdout.strip() == f"{local} is up to date: 5 files unchanged"


def test_many_files_round_trip(spec, tmp_path, no_leftovers):
    """Enough small files for the sender's flow control to wait on the helper many times."""
    local, remote, back = tmp_path / "many", tmp_path / "remote", tmp_path / "back"
    wanted = {f"d{i // 50}/f{i}.bin": os.urandom(i * 37 % 9000) for i in range(600)}
    for rel, content in wanted.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(content)
    assert rk("sync", spec, str(local), str(remote)).stdout.startswith("copied 600 files (")
    assert rk("sync", spec, str(remote), str(back), "--pull").stdout.startswith(
        "copied 600 files ("
    )
    assert files_under(remote) == files_under(back) == wanted


def test_a_file_lands_inside_a_directory_destination(spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "data.csv", tmp_path / "remote"
    local.write_text("x,y\n")
    remote.mkdir()
    rk("sync", spec, str(local), str(remote))  # an existing directory
    rk("sync", spec, str(local), f"{tmp_path}/new/")  # a trailing slash
    rk("sync", spec, str(local), f"testhost:{tmp_path}/renamed.csv")  # a file name, scp style
    assert (remote / "data.csv").read_text() == "x,y\n"
    assert (tmp_path / "new" / "data.csv").read_text() == "x,y\n"
    assert (tmp_path / "renamed.csv").read_text() == "x,y\n"


def test_dry_run_lists_and_copies_nothing(spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "project", tmp_path / "remote"
    local.mkdir()
    make_tree(local)
    dry = rk("sync", spec, str(local), str(remote), "--dry-run")
    lines = dry.stdout.splitlines()
    assert lines[:-1] == ["data/nested/deep.txt", "data/train.csv", "run.sh", "secret.key",
                          "train.py"]  # fmt: skip
    assert lines[-1].startswith("dry run: would copy 5 files (")
    assert not remote.exists()


def test_sync_goes_through_the_jump_host(jump_spec, tmp_path, no_leftovers):
    local, remote = tmp_path / "notes.txt", tmp_path / "on-target" / "notes.txt"
    local.write_text("via the bastion")
    done = rk("sync", jump_spec(), str(local), str(remote))
    assert done.stdout.startswith(f"copied 1 file (15 B) to gpu:{remote} in ")
    assert remote.read_text() == "via the bastion"


# -- failures: one line, exit status 1, nothing half-written, nothing left running ----------


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests mount file systems and must run as root", pytrace=False)


@contextlib.contextmanager
def mounted(path: Path, *args: str) -> Iterator[Path]:
    need_root()
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", *args, str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=30)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (created) as a read-only bind mount of itself."""
    with mounted(path, "--bind", str(path)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True, timeout=30)
        yield path


def test_missing_local_path(spec, tmp_path, no_leftovers):
    error = one_line_error(
        rk("sync", spec, str(tmp_path / "nope.csv"), str(tmp_path / "r"), check=False)
    )
    assert error == f"local path {tmp_path / 'nope.csv'} does not exist; check the path"
    assert not (tmp_path / "r").exists()


def test_missing_remote_path_on_pull(spec, tmp_path, no_leftovers):
    proc = rk("sync", spec, str(tmp_path / "gone"), str(tmp_path / "here"), "--pull", check=False)
    assert f"testhost:{tmp_path / 'gone'} does not exist; check the path" in one_line_error(proc)
    assert not (tmp_path / "here").exists()


def test_remote_directory_on_a_read_only_file_system(spec, tmp_path, no_leftovers):
    local = tmp_path / "project"
    local.mkdir()
    make_tree(local)
    with read_only(tmp_path / "ro") as ro:
        error = one_line_error(rk("sync", spec, str(local), str(ro / "project"), check=False))
        assert f"cannot create directory testhost:{ro / 'project'}: read-only file system" in error
        assert "choose a writable directory" in error
        assert not list(ro.iterdir())


def test_full_remote_disk_leaves_the_old_file_and_no_temp_file(spec, tmp_path, no_leftovers):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as small:
        (small / "big.bin").write_bytes(b"old version")
        error = one_line_error(rk("sync", spec, str(big), str(small) + "/", check=False))
        assert f"cannot write testhost:{small / 'big.bin'}: no space left" in error
        assert "free space there or choose another directory" in error
        assert (small / "big.bin").read_bytes() == b"old version"
        assert not temp_files(small)


def test_permission_error_on_an_immutable_directory(spec, tmp_path, no_leftovers):
    need_root()
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(["chattr", "+i", str(locked)], check=True, timeout=30)
    try:
        error = one_line_error(rk("sync", spec, str(tmp_path / "a.txt"), str(locked), check=False))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True, timeout=30)
    assert f"cannot write testhost:{locked / 'a.txt'}: operation not permitted" in error
    assert "fix its permissions" in error
    assert not list(locked.iterdir())


def test_pull_into_a_read_only_local_directory(spec, tmp_path, no_leftovers):
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "a.txt").write_text("a")
    with read_only(tmp_path / "ro") as ro:
        proc = rk("sync", spec, str(tmp_path / "remote"), str(ro), "--pull", check=False)
        assert f"cannot write {ro / 'a.txt'}: read-only file system" in one_line_error(proc)


def test_interrupted_push_leaves_no_partial_file(spec, tmp_path, no_leftovers):
    big, remote = tmp_path / "big.bin", tmp_path / "remote"
    with big.open("wb") as f:
        f.truncate(2 << 30)  # sparse: cheap to make, 2 GiB to send
    remote.mkdir()
    sync = subprocess.Popen(
        [sys.executable, "-m", "jupyter_remote_provisioner", "sync", spec, str(big), str(remote)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: temp_files(remote), 30, "the transfer to start")
        sync.send_signal(signal.SIGINT)
        _, stderr = sync.communicate(timeout=30)
    finally:
        sync.kill()
    assert sync.returncode == 130 and stderr.strip().endswith("interrupted"), stderr
    wait_for(lambda: not temp_files(remote), 10, "the partial file to be removed")
    assert not list(remote.iterdir())
