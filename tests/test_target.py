"""How host specs, jump lists and the ssh config combine into a chain of hops (like ssh)."""

from __future__ import annotations

import getpass

import pytest

from jupyter_remote_provisioner.errors import ConfigError
from jupyter_remote_provisioner.target import parse_endpoint, resolve

CONFIG = """
Host gpu
    HostName 198.18.2.2
    User alice
    ProxyJump bastion
Host bastion
    HostName 198.18.1.2
    Port 2200
    IdentityFile ~/.ssh/id_bastion
Host *
    UserKnownHostsFile /etc/jrp_known_hosts
"""


@pytest.fixture
def ssh_config(tmp_path):
    path = tmp_path / "config"
    path.write_text(CONFIG)
    return str(path)


@pytest.mark.parametrize(
    ("text", "user", "host", "port"),
    [
        ("gpu", None, "gpu", None),
        ("bob@gpu", "bob", "gpu", None),
        ("bob@10.0.0.1:2222", "bob", "10.0.0.1", 2222),
        ("[::1]:2222", None, "::1", 2222),
        ("a@b@host", "a@b", "host", None),
    ],
)
def test_parse_endpoint(text, user, host, port):
    endpoint = parse_endpoint(text)
    assert (endpoint.user, endpoint.host, endpoint.port) == (user, host, port)


@pytest.mark.parametrize("text", ["", "a b", "@host", "host:0", "host:65536", "host:ssh", "[::1"])
def test_bad_endpoints_say_what_is_expected(text):
    with pytest.raises(ConfigError, match="invalid"):
        parse_endpoint(text)


def test_alias_follows_proxyjump_and_config(ssh_config):
    target = resolve("gpu", ssh_config=ssh_config)
    bastion, gpu = target.hops
    assert (bastion.hostname, bastion.port, bastion.user) == ("198.18.1.2", 2200, getpass.getuser())
    assert bastion.identity_files[0].endswith("/.ssh/id_bastion")
    assert (gpu.hostname, gpu.port, gpu.user) == ("198.18.2.2", 22, "alice")
    assert gpu.known_hosts == ("/etc/jrp_known_hosts",)
    assert target.ssh_command() == f"ssh -J {getpass.getuser()}@bastion:2200 alice@gpu"


def test_explicit_jump_replaces_proxyjump_and_user_wins(ssh_config):
    target = resolve("bob@gpu:2022", jump="carol@hop1:23,hop2", ssh_config=ssh_config)
    assert [h.alias for h in target.hops] == ["hop1", "hop2", "gpu"]
    assert (target.hops[0].user, target.hops[0].port) == ("carol", 23)
    assert (target.host.user, target.host.port) == ("bob", 2022)


def test_jump_as_list_and_none(ssh_config):
    assert [h.alias for h in resolve("gpu", jump=["bastion"], ssh_config=ssh_config).hops] == [
        "bastion",
        "gpu",
    ]
    # Like `ssh -J none`: no jump host at all, the config's ProxyJump is overridden.
    assert len(resolve("gpu", jump="none", ssh_config=ssh_config).hops) == 1


def test_ssh_config_off_and_explicit_files(ssh_config, tmp_path):
    plain = resolve("gpu", ssh_config=None)
    assert [(h.hostname, h.port) for h in plain.hops] == [("gpu", 22)]
    key = tmp_path / "id"
    key.write_text("")
    target = resolve("gpu", ssh_config=ssh_config, identity_file=str(key), known_hosts="/kh")
    assert all(h.identity_files == (str(key),) and h.known_hosts == ("/kh",) for h in target.hops)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="ssh config file .* does not exist"):
        resolve("gpu", ssh_config=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="identity file .* does not exist"):
        resolve("gpu", ssh_config=None, identity_file=str(tmp_path / "nokey"))


def test_proxyjump_loop_is_an_error(tmp_path):
    path = tmp_path / "config"
    path.write_text("Host a\n    ProxyJump b\nHost b\n    ProxyJump a\n")
    with pytest.raises(ConfigError, match="too long or loops"):
        resolve("a", ssh_config=str(path))


def test_host_key_command_checks_the_files_the_kernel_reads(ssh_config, tmp_path):
    """A bare `ssh` would check (and record) keys in ~/.ssh/known_hosts: the hint's command
    names the spec's files, for jump hosts too (through ProxyCommand, since `ssh -J` passes
    no -o to the jump host's ssh; %-tokens escaped once per level)."""
    me = getpass.getuser()
    assert resolve("gpu", jump="none", ssh_config=ssh_config).host_key_command() == (
        f"ssh -F {ssh_config} -o UserKnownHostsFile=/etc/jrp_known_hosts alice@gpu"
    )
    kh = tmp_path / "k%h"
    target = resolve("gpu", ssh_config=None, known_hosts=str(kh), jump="a@b:2200")
    inner = f"ssh -o UserKnownHostsFile={tmp_path}/k%%%%h -p 2200 -W '\"'\"'[%h]:%p'\"'\"' a@b"
    assert target.host_key_command() == (
        f"ssh -o UserKnownHostsFile={tmp_path}/k%%h -o 'ProxyCommand={inner}' {me}@gpu"
    )
    plain = resolve("gpu", jump="a@b:2200", ssh_config=None)
    assert plain.host_key_command() == f"ssh -J a@b:2200 {me}@gpu"
