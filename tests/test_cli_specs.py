"""The kernelspec commands (add, list, show, delete) run as real processes.

Every run gets its own HOME and Jupyter dirs, so nothing reads or writes the user's own, and
the example hosts are never contacted: these commands make no connection.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_remote_provisioner import __version__

from kernels import one_line_error

EXAMPLES = Path(__file__).resolve().parent.parent / "kernelspecs"
DOC_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "127.0.0.0/8")  # RFC 5737
EXAMPLE_DIRS = ("remote_direct", "remote_bastion", "remote_ssh_alias", "remote_r")
TIMEOUT = 60
BIN = os.path.dirname(sys.executable)

SSH_CONFIG = """\
Host gpu
    HostName 198.18.2.2
    User alice
    ProxyJump bastion
"""

CUDA_SUMMARY = "Remote CUDA -> ubuntu@192.0.2.10:22 via gw@198.51.100.1:3223"
CUDA_LIST = """\
slug: remote_cuda
  name: Remote CUDA
  endpoint: ubuntu@192.0.2.10:22
  jump: gw@198.51.100.1:3223
---
"""


def script(name: str) -> str:
    """A console script of this Python installation (not a shim that may pick another)."""
    path = os.path.join(BIN, name)
    found = path if os.path.isfile(path) else shutil.which(name)
    assert found, f"{name} is not installed; run pip install -e ."
    return found


class Cli:
    """Runs commands with HOME and the Jupyter dirs pointing into one temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.home = root / "home"
        self.home.mkdir()
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "JUPYTER_DATA_DIR": str(self.data),
            "JUPYTER_PATH": str(self.data),
            "JUPYTER_CONFIG_DIR": str(root / "config"),
            "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
            "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        }
        self.env.pop("JUPYTER_PREFER_ENV_PATH", None)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(argv), check=False, env=self.env, capture_output=True, text=True, timeout=TIMEOUT
        )
        if check:
            assert proc.returncode == 0, f"{argv} failed: {proc.stdout}{proc.stderr}"
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def rk(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m jupyter_remote_provisioner.cli ARGS``."""
        return self.run(sys.executable, "-m", "jupyter_remote_provisioner.cli", *args, check=check)

    def jupyter(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(script("jupyter"), *args)

    def fails(self, *args: str) -> str:
        """Run a command that must fail cleanly; return its one-line error."""
        return one_line_error(self.rk(*args, check=False))


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_add_list_show_delete(cli: Cli) -> None:
    kernels = cli.data / "kernels"
    add = ("add", "--endpoint", "ubuntu@192.0.2.10:22", "-J", "gw@198.51.100.1:3223")
    out = cli.rk(*add, "--name", "Remote CUDA").stdout
    assert out == (
        "Installed kernelspec remote_cuda (Remote CUDA -> ubuntu@192.0.2.10:22 via "
        f"gw@198.51.100.1:3223) in {kernels / 'remote_cuda'}\n"
    )
    spec = json.loads((kernels / "remote_cuda" / "kernel.json").read_text())
    assert spec["argv"][0] == script("jupyter-remote-kernel")

    assert cli.rk("list").stdout == CUDA_LIST
    assert "remote_cuda" in cli.jupyter("kernelspec", "list").stdout
    [entry] = json.loads(cli.rk("list", "--json").stdout)
    assert entry == {
        "slug": "remote_cuda",
        "name": "Remote CUDA",
        "endpoint": "ubuntu@192.0.2.10:22",
        "jump": ["gw@198.51.100.1:3223"],
        "resource_dir": str(kernels / "remote_cuda"),
        "config": {"host": "ubuntu@192.0.2.10:22", "jump": ["gw@198.51.100.1:3223"]},
    }

    show = cli.rk("show", "remote_cuda").stdout
    assert f"  path: {kernels / 'remote_cuda'}\n" in show
    assert '"provisioner_name": "remote-ssh-provisioner"' in show
    known_hosts = cli.home / ".ssh" / "known_hosts"
    assert (
        "  hop 1 (jump host): gw@198.51.100.1:3223\n    alias: 198.51.100.1\n    HostName: 198.51.100.1\n"
        "    port: 3223\n    user: gw\n    identity files: default (ssh-agent, ~/.ssh/id_*)\n"
        f"    known_hosts: {known_hosts}\n"
    ) in show
    assert "  hop 2 (kernel host): ubuntu@192.0.2.10\n" in show
    assert "  ssh command: ssh -J gw@198.51.100.1:3223 ubuntu@192.0.2.10\n" in show
    assert "remote cwd: ~ (remote home)\n" in show

    error = cli.fails(*add, "--name", "Remote CUDA")
    assert error == (
        f"kernelspec remote_cuda already exists at {kernels / 'remote_cuda'}; "
        "use --replace to overwrite it"
    )
    cli.rk(*add, "--name", "Remote CUDA", "--cwd", "/data", "--replace")
    assert "remote cwd: /data\n" in cli.rk("show", "Remote CUDA").stdout

    out = cli.rk("delete", "Remote CUDA").stdout
    assert out == f"Removed kernelspec remote_cuda ({kernels / 'remote_cuda'})\n"
    assert not (kernels / "remote_cuda").exists()
    assert cli.rk("list").stdout == "No remote kernelspecs installed.\n"
    assert cli.rk("list", "--json").stdout.strip() == "[]"
    assert cli.fails("delete", "Remote CUDA") == (
        "no remote kernelspec named Remote CUDA; see `remote_kernel list`"
    )


def test_show_resolves_ssh_config_alias(cli: Cli) -> None:
    ssh_config = cli.root / "ssh_config"
    ssh_config.write_text(SSH_CONFIG)
    out = cli.rk("add", "--endpoint", "gpu", "--ssh-config", str(ssh_config)).stdout
    assert out.startswith("Installed kernelspec gpu (gpu -> gpu) in ")
    show = cli.rk("show", "gpu").stdout
    me = getpass.getuser()
    assert "target: alice@gpu (198.18.2.2) via bastion\n" in show
    assert f"  ssh config: {ssh_config}\n" in show
    assert f"  hop 1 (jump host): {me}@bastion\n" in show
    assert "    alias: gpu\n    HostName: 198.18.2.2\n    port: 22\n    user: alice\n" in show
    assert f"  ssh command: ssh -F {ssh_config} -J {me}@bastion alice@gpu\n" in show

    info = json.loads(cli.rk("show", "gpu", "--json").stdout)
    assert info["kernel_json"]["metadata"]["kernel_provisioner"]["config"] == {
        "host": "gpu",
        "ssh_config": str(ssh_config),
    }
    assert [h["hostname"] for h in info["target"]["hops"]] == ["bastion", "198.18.2.2"]
    assert info["target"]["ssh_command"] == f"ssh -F {ssh_config} -J {me}@bastion alice@gpu"

    # An explicit -J replaces the alias's ProxyJump, as with ssh -J.
    cli.rk(
        "add", "--endpoint", "gpu", "--ssh-config", str(ssh_config), "-J", "gw@b1,b2:2", "--replace"
    )
    assert (
        f"ssh command: ssh -F {ssh_config} -J gw@b1,{me}@b2:2 alice@gpu\n"
        in cli.rk("show", "gpu").stdout
    )


def test_add_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    assert "invalid host 'bad host'" in cli.fails("add", "--endpoint", "bad host")
    assert "invalid port in 'gpu:70000'" in cli.fails("add", "--endpoint", "gpu:70000")
    assert "invalid host 'b d'" in cli.fails("add", "--endpoint", "gpu", "-J", "ok,b d")
    assert "invalid --env 'NOVALUE'" in cli.fails("add", "--endpoint", "gpu", "--env", "NOVALUE")
    assert "invalid kernel name 'GPU'" in cli.fails(
        "add", "--endpoint", "gpu", "--kernel-name", "GPU"
    )
    assert "cannot make a kernel name from '???'" in cli.fails(
        "add", "--endpoint", "gpu", "--name", "???"
    )
    missing = tmp_path / "missing"
    assert f"ssh config file {missing} does not exist" in cli.fails(
        "add", "--endpoint", "gpu", "--ssh-config", str(missing)
    )
    assert "--identity-file" in cli.fails(
        "add", "--endpoint", "gpu", "--identity-file", str(missing)
    )
    assert "must contain {connection_file}" in cli.fails(
        "add", "--endpoint", "gpu", "--kernel-argv", "R --slave"
    )
    assert cli.fails("add", "--endpoint", "gpu", "--kernel-argv", 'R "x') == (
        "invalid --kernel-argv 'R \"x': no closing quotation; quote it as you would in a shell"
    )
    assert "invalid kernel name" in cli.fails(
        "add", "--endpoint", "gpu", "--kernel-name", "k" * 300
    )
    assert not (cli.data / "kernels").exists()


def test_add_out_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    add = ("add", "--endpoint", "gpu", "--name", "GPU")
    assert cli.fails(*add, "--out", str(a_file)) == (
        f"--out {a_file} is not a directory; give a directory to write into"
    )
    assert cli.fails(*add, "--out", str(a_file / "below")) == (
        f"cannot write kernelspec gpu in {a_file / 'below'}: Not a directory; give a "
        f"directory you can write to with --out"
    )
    assert cli.fails(*add, "--out", "/proc/no-such-dir").startswith(
        "cannot write kernelspec gpu in /proc/no-such-dir: "
    )


def test_add_long_name_makes_a_short_kernel_name(cli: Cli) -> None:
    name = "Remote " + "x" * 300
    out = cli.rk("add", "--endpoint", "gpu", "--name", name).stdout
    slug = "remote_" + "x" * 57
    assert out.startswith(f"Installed kernelspec {slug} ({name} -> gpu) in ")
    spec = json.loads((cli.data / "kernels" / slug / "kernel.json").read_text())
    assert spec["display_name"] == name


def test_add_options_reach_kernel_json(cli: Cli) -> None:
    key = cli.root / "id_test"
    key.write_text("not a real key\n")
    cli.rk(
        "add", "--endpoint", "alice@gpu:2222", "-J", "a,b", "-J", "c", "--name", "R on GPU",
        "--kernel-name", "r_gpu", "--python", "/opt/py/bin/python", "--env", "A=1",
        "--env", "B=x=y", "--cwd", "~/work", "--language", "R", "--identity-file", str(key),
        "--known-hosts", "~/.ssh/kh", "--kernel-argv",
        "R --slave -e 'IRkernel::main()' --args {connection_file}",
    )  # fmt: skip
    spec = json.loads((cli.data / "kernels" / "r_gpu" / "kernel.json").read_text())
    assert spec["display_name"] == "R on GPU"
    assert spec["language"] == "R"
    assert spec["metadata"]["kernel_provisioner"]["config"] == {
        "host": "alice@gpu:2222",
        "jump": ["a", "b", "c"],
        "python": "/opt/py/bin/python",
        "env": {"A": "1", "B": "x=y"},
        "cwd": "~/work",
        "identity_file": str(key),
        "known_hosts": "~/.ssh/kh",
        "kernel_argv": ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"],
    }
    assert "  jump: a, b, c\n" in cli.rk("list").stdout


def test_out_dir_then_jupyter_kernelspec_install(cli: Cli) -> None:
    out_dir = cli.root / "out"
    out = cli.rk(
        "add", "--endpoint", "ubuntu@192.0.2.10:22", "-J", "gw@198.51.100.1:3223",
        "--name", "Remote CUDA", "--out", str(out_dir),
    ).stdout  # fmt: skip
    spec_dir = out_dir / "remote_cuda"
    assert out.splitlines() == [
        f"Wrote kernelspec remote_cuda ({CUDA_SUMMARY}) in {spec_dir}",
        f"Install it with: jupyter kernelspec install --user {spec_dir}",
    ]
    assert cli.rk("list").stdout == "No remote kernelspecs installed.\n"
    assert "already exists" in cli.fails(
        "add", "--endpoint", "gpu", "--name", "Remote CUDA", "--out", str(out_dir)
    )

    cli.jupyter("kernelspec", "install", "--user", str(spec_dir))
    assert cli.rk("list").stdout == CUDA_LIST
    installed = cli.data / "kernels" / "remote_cuda" / "kernel.json"
    assert installed.read_text() == (spec_dir / "kernel.json").read_text()


def test_install_locations(cli: Cli) -> None:
    prefix = cli.root / "env"
    proc = cli.rk("add", "--endpoint", "gpu", "--prefix", str(prefix))
    path = prefix / "share" / "jupyter" / "kernels" / "gpu"
    assert proc.stdout == f"Installed kernelspec gpu (gpu -> gpu) in {path}\n"
    assert f"add {prefix / 'share' / 'jupyter'} to JUPYTER_PATH" in proc.stderr
    assert (path / "kernel.json").is_file()
    cli.env["JUPYTER_PATH"] += os.pathsep + str(prefix / "share" / "jupyter")
    assert "slug: gpu\n" in cli.rk("list").stdout
    out = cli.rk("add", "--endpoint", "gpu", "--name", "GPU user", "--user").stdout
    assert f"in {cli.data / 'kernels' / 'gpu_user'}\n" in out
    usage = cli.rk("add", "--endpoint", "gpu", "--user", "--prefix", "x", check=False)
    assert usage.returncode == 2 and "not allowed with argument" in usage.stderr


def test_delete_refuses_other_kernelspecs(cli: Cli) -> None:
    local = cli.data / "kernels" / "plain_local"
    local.mkdir(parents=True)
    spec = {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    spec |= {"display_name": "Plain Local", "language": "python"}
    (local / "kernel.json").write_text(json.dumps(spec))
    for name in ("plain_local", "Plain Local"):
        assert cli.fails("delete", name) == (
            "kernelspec plain_local is not a remote kernel (its provisioner is "
            "local-provisioner); remove it with `jupyter kernelspec remove plain_local`"
        )
    assert "not a remote kernel" in cli.fails("show", "plain_local")
    assert (local / "kernel.json").is_file()
    assert cli.rk("list").stdout == "No remote kernelspecs installed.\n"


@pytest.mark.parametrize("command", ["add", "list", "show", "delete"])
def test_subcommand_help(cli: Cli, command: str) -> None:
    out = cli.rk(command, "--help").stdout
    assert out.startswith(f"usage: remote_kernel {command}")
    assert "options:" in out


def test_help_version_and_entry_points(cli: Cli) -> None:
    top = cli.rk("--help").stdout
    for command in ("add", "list", "show", "delete"):
        assert command in top
    assert cli.rk("--version").stdout.strip() == f"remote_kernel {__version__}"
    assert cli.run(script("remote_kernel"), "--version").stdout.strip() == (
        f"remote_kernel {__version__}"
    )
    assert cli.jupyter("remote-kernel", "--version").stdout.strip() == (
        f"jupyter remote-kernel {__version__}"
    )
    help_text = cli.jupyter("remote-kernel", "add", "--help").stdout
    assert help_text.startswith("usage: jupyter remote-kernel add")


def test_example_kernelspecs_install_and_list(cli: Cli) -> None:
    prefix = cli.root / "prefix"
    for name in EXAMPLE_DIRS:
        cli.jupyter("kernelspec", "install", "--prefix", str(prefix), str(EXAMPLES / name))
    cli.env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    kernels = prefix / "share" / "jupyter" / "kernels"

    specs = json.loads(cli.jupyter("kernelspec", "list", "--json").stdout)["kernelspecs"]
    for name in EXAMPLE_DIRS:
        assert specs[name]["resource_dir"] == str(kernels / name)
        provisioner = specs[name]["spec"]["metadata"]["kernel_provisioner"]
        assert provisioner["provisioner_name"] == "remote-ssh-provisioner"
    assert specs["remote_r"]["spec"]["language"] == "R"

    listing = cli.run(script("remote_kernel"), "list").stdout
    blocks = listing.split("---\n")
    assert [b.splitlines()[0] for b in blocks if b] == [f"slug: {n}" for n in sorted(EXAMPLE_DIRS)]
    assert (
        "slug: remote_bastion\n  name: Remote Python (10.0.0.5 via bastion)\n"
        "  endpoint: alice@10.0.0.5\n  jump: gw@bastion.example.com:2222\n"
    ) in listing
    assert "slug: remote_direct\n  name: Remote Python (gpu.example.com)\n" in listing

    entries = json.loads(cli.jupyter("remote-kernel", "list", "--json").stdout)
    assert {e["slug"]: e["endpoint"] for e in entries} == {
        "remote_bastion": "alice@10.0.0.5",
        "remote_direct": "alice@gpu.example.com:22",
        "remote_r": "alice@gpu.example.com",
        "remote_ssh_alias": "gpu",
    }

    show = cli.rk("show", "remote_r").stdout
    assert "remote kernel: R --slave -e 'IRkernel::main()' --args {connection_file}\n" in show
    assert "\nwarning: kernel traffic: unencrypted loopback tcp ports on gpu.example.com" in show
    show = cli.rk("show", "remote_ssh_alias").stdout
    assert "  ssh command: ssh " in show and "remote cwd: ~/work\n" in show


def test_add_without_name_makes_a_readable_slug(cli: Cli) -> None:
    out = cli.rk("add", "--endpoint", "ubuntu@192.0.2.10:2222").stdout
    assert out.startswith(
        "Installed kernelspec ubuntu_192.0.2.10_2222 (ubuntu@192.0.2.10:2222 -> "
        "ubuntu@192.0.2.10:2222) in "
    ), out


@pytest.mark.parametrize("command", ["", "add", "list", "show", "delete", "check", "launch",
                                     "ps", "stop", "attach", "sync", "demo"])  # fmt: skip
def test_help_uses_documentation_addresses(cli: Cli, command: str) -> None:
    """Examples name no real host: IPv4 from the documentation ranges, example.* domains."""
    text = cli.rk(*filter(None, [command]), "--help").stdout
    for address in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", text):
        ip = ipaddress.ip_address(address)
        assert any(ip in ipaddress.ip_network(n) for n in DOC_NETS), (address, text)
    for domain in re.findall(r"\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|io)\b", text):
        assert re.search(r"(^|\.)example\.(com|org|net)$", domain), (domain, text)


def ssh_as_printed(cli: Cli, slug: str) -> subprocess.CompletedProcess[str]:
    """Run the ``ssh command`` line that ``show SLUG`` prints, with ``echo ok`` appended."""
    line = next(x for x in cli.rk("show", slug).stdout.splitlines() if "ssh command:" in x)
    command = line.split("ssh command: ", 1)[1]
    return subprocess.run(["sh", "-c", f"{command} echo ok"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30, check=False)  # fmt: skip


def test_show_prints_an_ssh_command_that_works(cli: Cli, ssh_env) -> None:
    """With the spec's ssh config (-F); with its own key and known_hosts, also through jump
    hosts (two hops through the same loopback sshd), where -J would not pass them on."""
    cli.rk("add", "--endpoint", ssh_env.alias, "--ssh-config", str(ssh_env.ssh_config),
           "--name", "Via Config")  # fmt: skip
    res = ssh_as_printed(cli, "via_config")
    assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr
    me = f"{ssh_env.user}@{ssh_env.host}:{ssh_env.port}"
    own = ("--identity-file", str(ssh_env.identity_file), "--known-hosts", str(ssh_env.known_hosts))
    cli.rk("add", "--endpoint", me, *own, "--name", "Own Files")
    cli.rk("add", "--endpoint", me, "-J", f"{me},{me}", *own, "--name", "Own Jumps")
    for slug in ("own_files", "own_jumps"):
        res = ssh_as_printed(cli, slug)
        assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr
