"""This package's kernelspecs: building, installing, listing, finding and removing them.

A remote kernelspec is an ordinary Jupyter kernelspec whose
``metadata.kernel_provisioner.provisioner_name`` is ``remote-ssh-provisioner``. Its ``argv``
runs the ``jupyter-remote-kernel launch`` console script, for clients that ignore
provisioners (VS Code). Everything here goes through jupyter_client's
:class:`~jupyter_client.kernelspec.KernelSpecManager`, so the specs land exactly where
``jupyter kernelspec`` looks for them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.paths import jupyter_path

from .errors import ConfigError
from .provisioner import RemoteSSHProvisioner
from .target import parse_endpoint, parse_jumps

PROVISIONER_NAME = "remote-ssh-provisioner"
LOCAL_PROVISIONER = "local-provisioner"  # jupyter_client's default when a spec names none
LAUNCHER = "jupyter-remote-kernel"
LAUNCH_ARGS = ("launch", "--kernelspec", "{resource_dir}", "-f", "{connection_file}")
MAX_SLUG = 64  # a kernel name is a directory name: far below the file system's 255 bytes
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_.]*$")
SLUG_RULE = (
    f"use at most {MAX_SLUG} lowercase letters a-z, digits, '_' and '.', starting with a "
    f"letter or digit"
)


def slugify(display_name: str) -> str:
    """The kernel name for a display name: ``Remote CUDA`` -> ``remote_cuda``; an endpoint
    keeps its parts apart: ``ubuntu@192.0.2.10:2222`` -> ``ubuntu_192.0.2.10_2222``."""
    text = unicodedata.normalize("NFKD", display_name).encode("ascii", "ignore").decode()
    text = re.sub(r"[\s\-@:/,]", "_", text.lower())
    text = re.sub(r"[^a-z0-9_.]", "", text)
    text = re.sub(r"_+", "_", text).lstrip("_.")[:MAX_SLUG].rstrip("_")
    if not text:
        raise ConfigError(
            f"cannot make a kernel name from {display_name!r}; pass --kernel-name ({SLUG_RULE})"
        )
    return text


def check_slug(slug: str) -> str:
    """Return ``slug`` if it is a valid kernel name, else raise a ConfigError."""
    if not SLUG_RE.match(slug) or len(slug) > MAX_SLUG:
        raise ConfigError(f"invalid kernel name {slug!r}: {SLUG_RULE}")
    return slug


def launcher_path() -> str:
    """Absolute path of the ``jupyter-remote-kernel`` console script of this installation.

    The script next to ``sys.executable`` comes first: it belongs to this very environment,
    whereas ``PATH`` may hold a shim (pyenv) that picks an interpreter per directory.
    """
    sibling = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), LAUNCHER)
    if os.path.isfile(sibling) and os.access(sibling, os.X_OK):
        return sibling
    found = shutil.which(LAUNCHER)
    return os.path.abspath(found) if found else sibling


def build_spec(
    display_name: str,
    host: str,
    jump: Sequence[str] | str = (),
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    language: str = "python",
    extra_config: Mapping[str, Any] | None = None,
    curve: bool = False,
) -> dict[str, Any]:
    """The ``kernel.json`` dict of a remote kernel; raises ConfigError for a bad setting.

    The config holds only the keys given, and is validated by the provisioner itself, so a
    mistake shows up when the spec is added rather than when the kernel starts. The spec
    declares CurveZMQ support (``metadata.supported_encryption``) for ipykernel, whose
    version the provisioner checks at start, and for a ``kernel_argv`` kernel when ``curve``.
    """
    if not display_name.strip():
        raise ConfigError("the display name is empty; pass --name")
    parse_endpoint(host)
    items = jump.split(",") if isinstance(jump, str) else list(jump)
    jumps = [str(j).strip() for j in items if str(j).strip()]
    parse_jumps(jumps)
    config: dict[str, Any] = {"host": host}
    if jumps:
        config["jump"] = jumps
    if python:
        config["python"] = python
    if env:
        config["env"] = dict(env)
    if cwd:
        config["cwd"] = cwd
    for key, value in (extra_config or {}).items():
        if key in config:
            raise ConfigError(f"config key {key!r} is given twice")
        config[key] = value
    validate_config(config)
    metadata: dict[str, Any] = {
        "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config}
    }
    if curve or not config.get("kernel_argv"):
        metadata["supported_encryption"] = ["curve"]
    return {
        "argv": [launcher_path(), *LAUNCH_ARGS],
        "display_name": display_name,
        "language": language,
        "interrupt_mode": "signal",
        "metadata": metadata,
    }


def validate_config(config: Mapping[str, Any]) -> None:
    """Check keys and values the way the provisioner will when the kernel starts."""
    RemoteSSHProvisioner.check_keys(config)
    RemoteSSHProvisioner(**config)


def write_spec_dir(spec: Mapping[str, Any], directory: str | os.PathLike[str]) -> str:
    """Write ``kernel.json`` into ``directory`` (created); return the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    return str(path)


def install_spec(
    spec: Mapping[str, Any],
    slug: str,
    user: bool = False,
    prefix: str | None = None,
    replace: bool = False,
) -> str:
    """Install ``spec`` as kernel ``slug`` with jupyter_client; return the installed path.

    ``user`` installs into Jupyter's user data dir, ``prefix`` into PREFIX/share/jupyter,
    neither into the system-wide dir. An existing kernel of that name anywhere on Jupyter's
    path is an error unless ``replace``.
    """
    check_slug(slug)
    manager = _manager()
    existing = manager.find_kernel_specs().get(slug)
    if existing and not replace:
        raise ConfigError(
            f"kernelspec {slug} already exists at {existing}; use --replace to overwrite it"
        )
    with tempfile.TemporaryDirectory(prefix="remote-kernelspec-") as tmp:
        try:
            source = write_spec_dir(spec, os.path.join(tmp, slug))
            return manager.install_kernel_spec(source, kernel_name=slug, user=user, prefix=prefix)
        except OSError as exc:
            raise ConfigError(
                f"cannot install kernelspec {slug}: {exc.strerror or exc}"
                f"{'' if user else '; use --user to install it for your account only'}"
            ) from exc


def on_search_path(resource_dir: str) -> bool:
    """Whether Jupyter finds kernels in the directory holding ``resource_dir``."""
    parent = os.path.realpath(os.path.dirname(resource_dir))
    return any(os.path.realpath(d) == parent for d in _manager().kernel_dirs)


@dataclass
class RemoteSpec:
    """An installed kernelspec of this package."""

    slug: str
    display_name: str
    resource_dir: str
    config: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)  # the whole kernel.json

    @property
    def endpoint(self) -> str:
        return str(self.config.get("host", ""))

    @property
    def jumps(self) -> list[str]:
        """The jump hosts as written, in order (empty when none)."""
        value = self.config.get("jump")
        try:
            return [str(e) for e in parse_jumps(value)]
        except ConfigError:
            return [str(value)]

    def to_json(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "name": self.display_name,
            "endpoint": self.endpoint,
            "jump": self.jumps,
            "resource_dir": self.resource_dir,
            "config": self.config,
        }


def list_remote_specs() -> list[RemoteSpec]:
    """Every installed kernelspec that uses the remote provisioner, sorted by slug."""
    specs = (_to_remote(slug, entry) for slug, entry in _all_specs().items())
    return sorted((s for s in specs if s is not None), key=lambda s: s.slug)


def find_spec(name: str, removing: bool = False) -> RemoteSpec:
    """A remote kernelspec by slug, else by display name (exact, then case-insensitive).
    Another kind of kernelspec is refused; ``removing``: the refusal says how to remove it."""
    all_specs = _all_specs()
    if name in all_specs:
        return _ours_or_refuse(name, all_specs[name], removing)
    ours = list_remote_specs()
    for same in (lambda s: s == name, lambda s: s.casefold() == name.casefold()):
        matches = [s for s in ours if same(s.display_name)]
        if len(matches) > 1:
            slugs = ", ".join(s.slug for s in matches)
            raise ConfigError(f"several remote kernelspecs are named {name!r} ({slugs}); use one")
        if matches:
            return matches[0]
    for slug, entry in all_specs.items():
        if entry["spec"].get("display_name", "").casefold() == name.casefold():
            return _ours_or_refuse(slug, entry, removing)
    raise ConfigError(f"no remote kernelspec named {name}; see `remote_kernel list`")


def remove_spec(spec: RemoteSpec) -> str:
    """Remove an installed remote kernelspec; return the path removed."""
    try:
        return _manager().remove_kernel_spec(spec.slug)
    except KeyError:
        raise ConfigError(f"kernelspec {spec.slug} is no longer installed") from None
    except OSError as exc:
        raise ConfigError(f"cannot remove {spec.resource_dir}: {exc.strerror or exc}") from exc


def provisioner_of(spec: Mapping[str, Any]) -> str:
    """The provisioner a kernel.json dict names (jupyter_client's default when none)."""
    provisioner = spec.get("metadata", {}).get("kernel_provisioner", {})
    return str(provisioner.get("provisioner_name") or LOCAL_PROVISIONER)


def provisioner_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metadata.kernel_provisioner.config`` of a kernel.json dict (empty when none)."""
    provisioner = spec.get("metadata", {}).get("kernel_provisioner", {})
    return dict(provisioner.get("config") or {})


def _all_specs() -> dict[str, Any]:
    return _manager().get_all_specs()


def _manager() -> KernelSpecManager:
    """A KernelSpecManager that does not import IPython (0.2 s per command): the
    native python3 spec is never ours, and the legacy IPython kernels dir is found without
    IPython (where ``get_ipython_dir`` looks by default)."""
    ipython_dir = os.path.expanduser(os.environ.get("IPYTHONDIR") or "~/.ipython")
    dirs = [*jupyter_path("kernels"), os.path.join(ipython_dir, "kernels")]
    return KernelSpecManager(kernel_dirs=dirs, ensure_native_kernel=False)


def _to_remote(slug: str, entry: Mapping[str, Any]) -> RemoteSpec | None:
    spec = entry["spec"]
    if provisioner_of(spec) != PROVISIONER_NAME:
        return None
    return RemoteSpec(
        slug=slug,
        display_name=str(spec.get("display_name", slug)),
        resource_dir=str(entry["resource_dir"]),
        config=provisioner_config(spec),
        spec=dict(spec),
    )


def _ours_or_refuse(slug: str, entry: Mapping[str, Any], removing: bool) -> RemoteSpec:
    remote = _to_remote(slug, entry)
    if remote is None:
        hint = (
            f"remove it with `jupyter kernelspec remove {slug}`"
            if removing
            else "`jupyter kernelspec list` shows it; `remote_kernel list` shows the remote ones"
        )
        raise ConfigError(
            f"kernelspec {slug} is not a remote kernel (its provisioner is "
            f"{provisioner_of(entry['spec'])}); {hint}"
        )
    return remote
