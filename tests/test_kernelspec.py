"""Kernelspec rules: slugs, the kernel.json we build, and install/list/find/remove."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from jupyter_remote_provisioner.errors import ConfigError
from jupyter_remote_provisioner.kernelspec import (
    LAUNCH_ARGS,
    PROVISIONER_NAME,
    build_spec,
    check_slug,
    find_spec,
    install_spec,
    list_remote_specs,
    remove_spec,
    slugify,
    validate_config,
    write_spec_dir,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "kernelspecs"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Jupyter data dir (the --user location) and HOME for this test."""
    data = tmp_path / "data"
    (data / "kernels").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    return data


def write_local_spec(data_dir: Path, name: str, display_name: str) -> Path:
    """A plain local (ipykernel) kernelspec, not one of ours."""
    spec = {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    spec |= {"display_name": display_name, "language": "python"}
    return Path(write_spec_dir(spec, data_dir / "kernels" / name))


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Remote CUDA", "remote_cuda"),
        ("remote-cuda", "remote_cuda"),
        ("  GPU  box -- A100 (80 GB) ", "gpu_box_a100_80_gb"),
        ("py3.11 env", "py3.11_env"),
        ("Café Ünïcode", "cafe_unicode"),
        ("__x__", "x"),
        ("ubuntu@127.0.0.1:1", "ubuntu_127.0.0.1_1"),  # add without --name: the endpoint
        ("gw@bastion.example.com:2222", "gw_bastion.example.com_2222"),
        ("x" * 300, "x" * 64),
        ("a" * 63 + " b", "a" * 63),
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug
    assert check_slug(slug) == slug


@pytest.mark.parametrize("name", ["", "   ", "!!!", "ÆØ", "--"])
def test_slugify_empty_is_an_error(name: str) -> None:
    with pytest.raises(ConfigError, match="cannot make a kernel name") as err:
        slugify(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("slug", ["Remote", "_x", ".x", "a-b", "a b", "", "é", "x" * 65])
def test_explicit_kernel_name_rules(slug: str) -> None:
    with pytest.raises(ConfigError, match="lowercase letters a-z, digits, '_' and '.'"):
        check_slug(slug)


def test_build_spec_argv_and_metadata() -> None:
    spec = build_spec("Remote CUDA", "ubuntu@192.0.2.10:22", ["gw@198.51.100.1:3223"])
    launcher, *rest = spec["argv"]
    assert os.path.isabs(launcher) and os.path.basename(launcher) == "jupyter-remote-kernel"
    assert rest == ["launch", "--kernelspec", "{resource_dir}", "-f", "{connection_file}"]
    assert tuple(rest) == LAUNCH_ARGS
    assert spec["display_name"] == "Remote CUDA"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    assert spec["metadata"] == {
        "kernel_provisioner": {
            "provisioner_name": PROVISIONER_NAME,
            "config": {"host": "ubuntu@192.0.2.10:22", "jump": ["gw@198.51.100.1:3223"]},
        },
        "supported_encryption": ["curve"],  # ipykernel 7.4+; the provisioner checks at start
    }


def test_build_spec_declares_curve_for_kernel_argv_only_when_asked() -> None:
    r_argv = {"kernel_argv": ["R", "{connection_file}"]}
    assert "supported_encryption" not in build_spec("R", "gpu", extra_config=r_argv)["metadata"]
    spec = build_spec("R", "gpu", extra_config=r_argv, curve=True)
    assert spec["metadata"]["supported_encryption"] == ["curve"]


def test_build_spec_keeps_only_given_keys() -> None:
    config = build_spec("GPU", "gpu")["metadata"]["kernel_provisioner"]["config"]
    assert config == {"host": "gpu"}
    spec = build_spec(
        "GPU",
        "gpu",
        "gw@b:2222, other",
        python="/opt/conda/bin/python",
        env={"CUDA_VISIBLE_DEVICES": "0"},
        cwd="~/work",
        language="python",
        extra_config={"identity_file": "~/.ssh/id_gpu", "ssh_config": None, "connect_timeout": 5},
    )
    assert spec["metadata"]["kernel_provisioner"]["config"] == {
        "host": "gpu",
        "jump": ["gw@b:2222", "other"],
        "python": "/opt/conda/bin/python",
        "env": {"CUDA_VISIBLE_DEVICES": "0"},
        "cwd": "~/work",
        "identity_file": "~/.ssh/id_gpu",
        "ssh_config": None,
        "connect_timeout": 5,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "bad host"}, "invalid host 'bad host'"),
        ({"host": "gpu:0"}, "invalid port in 'gpu:0'"),
        ({"host": "@gpu"}, "empty user name"),
        ({"jump": ["ok", "bad hop"]}, "invalid host 'bad hop'"),
        ({"extra_config": {"hostname": "x"}}, "unknown key(s) 'hostname' in metadata.kernel_p"),
        ({"extra_config": {"transport": "udp"}}, "'transport' trait"),
        ({"env": {"A": 1}}, "'env' trait"),
        ({"extra_config": {"kernel_argv": ["R"]}}, "must contain {connection_file}"),
        ({"extra_config": {"host": "other"}}, "'host' is given twice"),
        ({"display_name": " "}, "display name is empty"),
        ({"env": {"A=B": "1"}}, "invalid environment variable 'A=B' in metadata.kernel_prov"),
        ({"env": {"": "1"}}, "invalid environment variable '' in metadata.kernel_provisioner"),
        ({"extra_config": {"launch_timeout": 0}}, "launch_timeout must be a number of seconds > 0"),
        ({"extra_config": {"connect_timeout": -1}}, "connect_timeout must be a number of secon"),
        ({"extra_config": {"orphan_timeout": -1}}, "orphan_timeout must be a number of seconds >="),
    ],
)
def test_build_spec_validation_errors(kwargs: dict, message: str) -> None:
    args = {"display_name": "GPU", "host": "gpu", **kwargs}
    with pytest.raises(ConfigError) as err:
        build_spec(**args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_install_list_find_remove_round_trip(data_dir: Path) -> None:
    spec = build_spec("Remote CUDA", "ubuntu@192.0.2.10:22", ["gw@198.51.100.1:3223"])
    path = install_spec(spec, "remote_cuda", user=True)
    assert path == str(data_dir / "kernels" / "remote_cuda")
    assert json.loads((Path(path) / "kernel.json").read_text()) == spec
    assert "remote_cuda" in KernelSpecManager().find_kernel_specs()

    [found] = list_remote_specs()  # the local python3 kernel is not listed
    assert (found.slug, found.display_name, found.resource_dir) == (
        "remote_cuda",
        "Remote CUDA",
        path,
    )
    assert found.endpoint == "ubuntu@192.0.2.10:22"
    assert found.jumps == ["gw@198.51.100.1:3223"]
    assert found.to_json()["config"] == spec["metadata"]["kernel_provisioner"]["config"]

    for name in ("remote_cuda", "Remote CUDA", "remote cuda", "REMOTE CUDA"):
        assert find_spec(name).slug == "remote_cuda"

    assert remove_spec(found) == path
    assert not Path(path).exists()
    assert list_remote_specs() == []
    with pytest.raises(ConfigError, match="no remote kernelspec named remote_cuda; see"):
        find_spec("remote_cuda")


def test_install_into_prefix(data_dir: Path, tmp_path: Path) -> None:
    path = install_spec(build_spec("GPU", "gpu"), "gpu", prefix=str(tmp_path / "env"))
    assert path == str(tmp_path / "env" / "share" / "jupyter" / "kernels" / "gpu")
    assert (Path(path) / "kernel.json").is_file()


def test_existing_spec_needs_replace(data_dir: Path) -> None:
    path = install_spec(build_spec("Remote CUDA", "gpu"), "remote_cuda", user=True)
    with pytest.raises(ConfigError) as err:
        install_spec(build_spec("Remote CUDA", "gpu2"), "remote_cuda", user=True)
    assert str(err.value) == (
        f"kernelspec remote_cuda already exists at {path}; use --replace to overwrite it"
    )
    assert find_spec("remote_cuda").endpoint == "gpu"
    install_spec(build_spec("Remote CUDA", "gpu2"), "remote_cuda", user=True, replace=True)
    assert find_spec("remote_cuda").endpoint == "gpu2"


def test_existing_local_spec_is_not_overwritten_silently(data_dir: Path) -> None:
    write_local_spec(data_dir, "local_py", "Local Python")
    with pytest.raises(ConfigError, match="kernelspec local_py already exists"):
        install_spec(build_spec("Local Python", "gpu"), "local_py", user=True)


def test_refuses_non_remote_spec(data_dir: Path) -> None:
    path = write_local_spec(data_dir, "local_py", "Local Python")
    for name in ("local_py", "Local Python", "local python"):
        with pytest.raises(ConfigError) as err:
            find_spec(name)
        assert str(err.value) == (
            "kernelspec local_py is not a remote kernel (its provisioner is local-provisioner); "
            "`jupyter kernelspec list` shows it; `remote_kernel list` shows the remote ones"
        )
        with pytest.raises(ConfigError) as err:
            find_spec(name, removing=True)
        assert str(err.value).endswith("; remove it with `jupyter kernelspec remove local_py`")
    assert path.is_dir()
    assert list_remote_specs() == []


def test_same_display_name_twice_is_ambiguous(data_dir: Path) -> None:
    install_spec(build_spec("GPU", "gpu1"), "gpu_a", user=True)
    install_spec(build_spec("GPU", "gpu2"), "gpu_b", user=True)
    with pytest.raises(
        ConfigError, match=r"several remote kernelspecs are named 'GPU' \(gpu_a, gpu_b\)"
    ):
        find_spec("GPU")
    assert find_spec("gpu_b").endpoint == "gpu2"


@pytest.mark.parametrize(
    "name", ["remote_direct", "remote_bastion", "remote_ssh_alias", "remote_r"]
)
def test_example_specs_are_valid(name: str) -> None:
    spec = json.loads((EXAMPLES / name / "kernel.json").read_text())
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == PROVISIONER_NAME
    validate_config(provisioner["config"])
    assert spec["argv"] == ["jupyter-remote-kernel", *LAUNCH_ARGS]
    assert spec["interrupt_mode"] == "signal"
