"""Fixtures for kernel tests: isolated Jupyter dirs, remote kernelspecs, leftover checks."""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_remote_provisioner import pool

from kernels import Leftovers, write_spec

_names = itertools.count(1)
# The remote side is this machine; sessions have sshd's plain PATH (see remote_session_env),
# whose python3 may lack ipykernel, so specs name this interpreter.
PYTHON = sys.executable
CURVE_DECLARED = {"supported_encryption": ["curve"]}  # a kernelspec's metadata


@pytest.fixture(scope="session", autouse=True)
def kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point Jupyter and IPython at private dirs so tests never touch the user's own."""
    root = tmp_path_factory.mktemp("jupyter")
    saved = {k: os.environ.get(k) for k in _JUPYTER_VARS}
    os.environ.update(
        JUPYTER_PATH=str(root / "data"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
        IPYTHONDIR=str(root / "ipython"),
    )
    kernels = root / "data" / "kernels"
    kernels.mkdir(parents=True)
    yield kernels
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_JUPYTER_VARS = (
    "JUPYTER_PATH",
    "JUPYTER_DATA_DIR",
    "JUPYTER_RUNTIME_DIR",
    "JUPYTER_CONFIG_DIR",
    "IPYTHONDIR",
)


def _spec_factory(
    kernels_dir: Path, request: pytest.FixtureRequest, base: dict[str, Any]
) -> Callable[..., str]:
    def make(
        interrupt_mode: str = "signal",
        argv: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **config: Any,
    ) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
        name = f"{slug}_{next(_names)}"
        config = {**base, **config}
        return write_spec(
            kernels_dir, name, config, interrupt_mode=interrupt_mode, argv=argv, metadata=metadata
        )

    return make


@pytest.fixture
def remote_spec(ssh_env, kernels_dir: Path, request: pytest.FixtureRequest) -> Callable[..., str]:
    """``remote_spec(**config)`` writes a kernelspec for the loopback sshd; returns its name."""
    base = {"host": ssh_env.alias, "ssh_config": str(ssh_env.ssh_config), "python": PYTHON}
    return _spec_factory(kernels_dir, request, base)


@pytest.fixture
def direct_spec(ssh_env, kernels_dir: Path, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Like ``remote_spec`` but with no ssh config: host, port, key and known_hosts given."""
    base = {
        "host": f"{ssh_env.user}@{ssh_env.host}:{ssh_env.port}",
        "ssh_config": None,
        "identity_file": str(ssh_env.identity_file),
        "known_hosts": str(ssh_env.known_hosts),
        "python": PYTHON,
    }
    return _spec_factory(kernels_dir, request, base)


@pytest.fixture
def jump_spec(topology, kernels_dir: Path, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Kernelspecs for the network-namespace target behind the bastion."""
    base = {"host": "gpu", "ssh_config": str(topology.ssh_config), "python": PYTHON}
    return _spec_factory(kernels_dir, request, base)


@pytest.fixture
def slurm_spec(
    slurm: Any, kernels_dir: Path, request: pytest.FixtureRequest, no_leftovers: Leftovers
) -> Callable[..., str]:
    """``slurm_spec(slurm={...}, **config)``: a Curve-declaring kernelspec for the login node.
    What the test leaves behind (processes, job dirs, sockets, threads) fails it, checked
    before the cluster is cleaned for the next test."""
    base = {"host": slurm.alias, "ssh_config": str(slurm.ssh_config), "python": PYTHON,
            "slurm": {}}  # fmt: skip
    make = _spec_factory(kernels_dir, request, base)

    def spec(**config: Any) -> str:
        return make(metadata=CURVE_DECLARED, **config)

    return spec


@pytest.fixture(autouse=True)
def close_kept_connections() -> Iterator[None]:
    """After each test, close the SSH connections kept for a next kernel (connection_persist),
    as the end of the process would: every test starts without one."""
    yield
    pool.close_kept_connections(timeout=10)


@pytest.fixture
def no_leftovers(remote_tmp: Path, close_kept_connections: None) -> Iterator[Leftovers]:
    """Fail the test if it leaves a listener, thread, remote process or remote file behind,
    once the connections kept for a next kernel are closed (as at the end of the process)."""
    snapshot = Leftovers.snapshot(remote_tmp)
    yield snapshot
    pool.close_kept_connections(timeout=10)
    snapshot.assert_clean()
