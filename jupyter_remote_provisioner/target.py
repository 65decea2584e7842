"""Where a kernel runs: ``[user@]host[:port]`` specs, jump chains and the ssh config.

A :class:`Target` is the fully resolved chain of hops, jump hosts first and the kernel's
host last, each merged with the user's ssh config the way ``ssh`` reads it (Host aliases,
HostName, User, Port, IdentityFile, ProxyJump, UserKnownHostsFile). It is hashable, so the
connection pool can share one SSH connection per target.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asyncssh.config import SSHClientConfig, SSHConfig

from .errors import ConfigError

DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
MAX_HOPS = 8

_HOST_RE = re.compile(r"^[A-Za-z0-9_.%*?:-]+$")


@dataclass(frozen=True)
class Endpoint:
    """One ``[user@]host[:port]`` as written by the user, before the ssh config."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port else self.host
        text = f"{self.user}@{host}" if self.user else host
        return f"{text}:{self.port}" if self.port else text


@dataclass(frozen=True)
class Hop:
    """One SSH server to authenticate to, after merging the ssh config."""

    alias: str  # the name the user wrote (a Host alias or a host name)
    hostname: str  # where TCP connects (HostName)
    port: int
    user: str
    identity_files: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = ()
    has_ciphers: bool = False  # the ssh config chooses Ciphers itself

    @property
    def label(self) -> str:
        """How messages name this hop: ``gpu (198.18.2.2)`` or ``gpu:2222``."""
        port = f":{self.port}" if self.port != 22 else ""
        if self.alias != self.hostname:
            return f"{self.alias} ({self.hostname}{port})"
        return f"{self.hostname}{port}"

    @property
    def spec(self) -> str:
        """``user@alias[:port]``, as ``ssh -J`` takes it (port shown when not 22)."""
        port = f":{self.port}" if self.port != 22 else ""
        return f"{self.user}@{self.alias}{port}"


@dataclass(frozen=True)
class Target:
    """A resolved chain: ``hops[:-1]`` are jump hosts in order, ``hops[-1]`` the kernel's host."""

    hops: tuple[Hop, ...]
    config_paths: tuple[str, ...] = ()

    @property
    def host(self) -> Hop:
        return self.hops[-1]

    @property
    def jumps(self) -> tuple[Hop, ...]:
        return self.hops[:-1]

    def describe(self) -> str:
        """``user@gpu (198.18.2.2) via bastion`` for logs and messages."""
        via = " via " + ", ".join(h.label for h in self.jumps) if self.jumps else ""
        return f"{self.host.user}@{self.host.label}{via}"

    def ssh_command(self) -> str:
        """The ``ssh`` command line (with ``-J``) that reaches the kernel's host by hand."""
        jump = " -J " + ",".join(h.spec for h in self.jumps) if self.jumps else ""
        host = self.host
        port = f" -p {host.port}" if host.port != 22 else ""
        return f"ssh{jump}{port} {host.user}@{host.alias}"

    def host_key_command(self) -> str:
        """The ``ssh`` command line that checks the host keys of this chain against the
        known_hosts files the kernel uses, so that a key accepted there is recorded where the
        kernel looks (a bare ``ssh`` records it in ~/.ssh/known_hosts). Jump hosts are
        reached by ProxyCommand when their known_hosts is not the default: ``ssh -J`` would
        check them against the default file."""
        return shlex.join(self._host_key_argv(len(self.hops)))

    def _host_key_argv(self, count: int) -> list[str]:
        """``ssh`` reaching ``hops[count - 1]``, through the hops before it."""
        hop, default = self.hops[count - 1], (str(Path(DEFAULT_KNOWN_HOSTS).expanduser()),)
        argv = ["ssh"]
        config = self.config_paths[0] if self.config_paths else None
        if config and config != str(Path(DEFAULT_SSH_CONFIG).expanduser()):
            argv += ["-F", config]
        if hop.known_hosts != default:  # ssh expands %-tokens in this option: escape them
            files = " ".join(path.replace("%", "%%") for path in hop.known_hosts)
            argv += ["-o", f"UserKnownHostsFile={files}"]
        if count > 1 and all(h.known_hosts == default for h in self.hops[: count - 1]):
            argv += ["-J", ",".join(h.spec for h in self.hops[: count - 1])]
        elif count > 1:  # the hop before it runs this one's %-expansion too: escape it
            before = [arg.replace("%", "%%") for arg in self._host_key_argv(count - 1)]
            argv += ["-o", "ProxyCommand=" + shlex.join([*before[:-1], "-W", "[%h]:%p",
                                                         before[-1]])]  # fmt: skip
        if hop.port != 22:
            argv += ["-p", str(hop.port)]
        return [*argv, f"{hop.user}@{hop.alias}"]


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``[user@]host[:port]`` (``[v6addr]:port`` for IPv6) with a clear error."""
    spec = text.strip()
    if not spec or any(c.isspace() for c in spec):
        raise ConfigError(f"invalid host {text!r}: expected [user@]host[:port] or an ssh alias")
    user: str | None = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
        if not user:
            raise ConfigError(f"invalid host {text!r}: empty user name before '@'")
    port_text: str | None = None
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid host {text!r}: expected [address]:port")
        port_text = rest[1:] or None
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    else:
        host = spec
    if not host or not _HOST_RE.match(host):
        raise ConfigError(f"invalid host {text!r}: expected [user@]host[:port] or an ssh alias")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"invalid port in {text!r}: expected a number from 1 to 65535")
        port = int(port_text)
    return Endpoint(host=host, user=user, port=port)


def parse_jumps(value: str | Sequence[str] | None) -> list[Endpoint]:
    """A jump list, like ``ssh -J``: a list or a comma-separated string; ``none`` means none."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [item.strip() for item in items if item and item.strip()]
    if [i.lower() for i in items] == ["none"]:
        return []
    return [parse_endpoint(item) for item in items]


def config_paths(ssh_config: str | Sequence[str] | None | object = ...) -> list[str]:
    """The ssh config files to read: the default when unset, none for ``None``."""
    if ssh_config is ...:
        default = Path(DEFAULT_SSH_CONFIG).expanduser()
        return [str(default)] if default.exists() else []
    if ssh_config is None:
        return []
    paths = [ssh_config] if isinstance(ssh_config, str) else list(ssh_config)  # type: ignore[call-overload]
    resolved = []
    for path in paths:
        full = Path(os.path.expandvars(str(path))).expanduser()
        if not full.is_file():
            raise ConfigError(
                f"ssh config file {path} does not exist; fix ssh_config in the kernelspec"
            )
        resolved.append(str(full))
    return resolved


def resolve(
    host: str,
    jump: str | Sequence[str] | None = None,
    ssh_config: str | Sequence[str] | None | object = ...,
    identity_file: str | None = None,
    known_hosts: str | None = None,
) -> Target:
    """Resolve a kernelspec's host and jump settings into a :class:`Target`.

    Like ``ssh -J``, an explicit jump list replaces the target's own ProxyJump; the first
    jump host's ProxyJump from the config still applies to it.
    """
    paths = config_paths(ssh_config)
    resolver = _Resolver(paths, identity_file, known_hosts)
    hops = resolver.chain(parse_endpoint(host), parse_jumps(jump) if jump else None, depth=0)
    return Target(hops=tuple(hops), config_paths=tuple(paths))


class _Resolver:
    """Merges endpoints with the ssh config files, following ProxyJump."""

    def __init__(self, paths: list[str], identity_file: str | None, known_hosts: str | None):
        self.paths = paths
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.local_user = getpass.getuser()

    def chain(self, endpoint: Endpoint, jumps: list[Endpoint] | None, depth: int) -> list[Hop]:
        """The hops to ``endpoint``: its jumps (or its ProxyJump, recursively), then itself."""
        if depth > MAX_HOPS:
            raise ConfigError(
                f"ProxyJump chain to {endpoint.host} is too long or loops; fix the ssh config"
            )
        config = self._lookup(endpoint)
        if jumps is None:
            jumps = parse_jumps(_text(config.get("ProxyJump")))
        hops: list[Hop] = []
        for index, jump in enumerate(jumps):
            if index == 0:
                hops.extend(self.chain(jump, None, depth + 1))
            else:
                hops.append(self._hop(jump, self._lookup(jump)))
        hops.append(self._hop(endpoint, config))
        return hops

    def _lookup(self, endpoint: Endpoint) -> SSHConfig:
        try:
            return SSHClientConfig.load(
                None,
                self.paths,
                False,
                False,
                False,
                self.local_user,
                endpoint.user if endpoint.user else (),
                endpoint.host,
                endpoint.port if endpoint.port else (),
            )
        except Exception as exc:  # asyncssh raises ConfigParseError and OSError here
            raise ConfigError(f"cannot read ssh config {', '.join(self.paths)}: {exc}") from exc

    def _hop(self, endpoint: Endpoint, config: SSHConfig) -> Hop:
        identity = (
            (str(Path(self.identity_file).expanduser()),)
            if self.identity_file
            else tuple(str(Path(p).expanduser()) for p in _list(config.get("IdentityFile")))
        )
        for path in identity:
            if self.identity_file and not Path(path).is_file():
                raise ConfigError(
                    f"identity file {path} does not exist; fix identity_file in the kernelspec"
                )
        known: tuple[str, ...] = (
            (self.known_hosts,)
            if self.known_hosts
            else tuple(_list(config.get("UserKnownHostsFile"))) or (DEFAULT_KNOWN_HOSTS,)
        )
        return Hop(
            alias=endpoint.host,
            hostname=_text(config.get("Hostname")) or endpoint.host,
            port=int(config.get("Port") or 22),  # type: ignore[call-overload]
            user=_text(config.get("User")) or self.local_user,
            identity_files=identity,
            known_hosts=tuple(str(Path(k).expanduser()) for k in known),
            has_ciphers=config.get("Ciphers") is not None,
        )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
