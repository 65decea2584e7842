"""``show NAME``: a remote kernelspec, its target as resolved with the ssh config, and what
runs where (the remote command, a Slurm request, who can read the traffic). No connection
is made."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from . import slurm_options
from .encryption import declares_curve, traffic
from .kernelspec import RemoteSpec, find_spec
from .provisioner import settings_from_config
from .target import Hop, Target
from .workdir import placement

_PLAIN = re.compile(r"^[\w@%+=:,./{}~-]+$")  # shown unquoted in a command line


def run_show(args: argparse.Namespace) -> int:
    """Print one spec and its resolved target (no connection is made)."""
    spec = find_spec(args.name)
    kernel_json = _read_kernel_json(spec)
    cwd = spec.config.get("cwd") or "~ (remote home)"
    path_map, uploads = spec.config.get("path_map") or {}, spec.config.get("upload") or []
    here = placement(os.getcwd(), path_map, spec.config.get("cwd")).cwd or "~ (remote home)"
    if args.json:
        target = _resolve(spec)
        info = {
            **spec.to_json(),
            "kernel_json": kernel_json,
            "cwd": cwd,
            "path_map": path_map,
            "cwd_here": here,
            "upload": uploads,
            "target": _target_json(target),
            "traffic_exposed": _traffic(spec)[0],
            "slurm": spec.config.get("slurm"),
        }
        print(json.dumps(info, indent=2))
        return 0
    print(f"kernelspec: {spec.slug}")
    print(f"  name: {spec.display_name}")
    print(f"  path: {spec.resource_dir}")
    print("  kernel.json:")
    for line in json.dumps(kernel_json, indent=2).splitlines():
        print(f"    {line}")
    sys.stdout.flush()
    target = _resolve(spec)
    print(f"target: {target.describe()}")
    print(f"  ssh config: {', '.join(target.config_paths) or 'none'}")
    for index, hop in enumerate(target.hops, 1):
        role = "kernel host" if hop is target.host else "jump host"
        print(f"  hop {index} ({role}): {hop.spec}")
        print(f"    alias: {hop.alias}")
        print(f"    HostName: {hop.hostname}")
        print(f"    port: {hop.port}")
        print(f"    user: {hop.user}")
        keys = ", ".join(hop.identity_files) or "default (ssh-agent, ~/.ssh/id_*)"
        print(f"    identity files: {keys}")
        print(f"    known_hosts: {', '.join(hop.known_hosts)}")
    print(f"  ssh command: {target.ssh_command()}")
    print(f"remote kernel: {_remote_command(spec.config)}")
    settings = settings_from_config(spec.config)
    for line in slurm_options.describe(settings.slurm, settings.target.host.label):
        print(line)
    print(_traffic(spec)[1])
    print(f"remote cwd: {cwd}")
    for local, remote in path_map.items():
        print(f"  for notebooks under {local}: the same place under {remote}")
    if path_map:
        print(f"  for a notebook in {os.getcwd()}: {here}")
    if uploads:
        print(f"uploaded before each start: {', '.join(uploads)} (from the notebook's directory)")
    return 0


def _resolve(spec: RemoteSpec) -> Target:
    """The target exactly as the provisioner resolves it (ssh config merged)."""
    return settings_from_config(spec.config).target


def _target_json(target: Target) -> dict[str, Any]:
    def hop(h: Hop) -> dict[str, Any]:
        return {
            "role": "kernel host" if h is target.host else "jump host",
            "alias": h.alias,
            "hostname": h.hostname,
            "port": h.port,
            "user": h.user,
            "identity_files": list(h.identity_files),
            "known_hosts": list(h.known_hosts),
        }

    return {
        "describe": target.describe(),
        "ssh_config": list(target.config_paths),
        "hops": [hop(h) for h in target.hops],
        "ssh_command": target.ssh_command(),
    }


def _traffic(spec: RemoteSpec) -> tuple[bool, str]:
    """Whether other users of the host can read the kernel's traffic, and the line that
    says so (see :func:`.encryption.traffic`)."""
    settings = settings_from_config(spec.config)
    declared = declares_curve(spec.spec.get("metadata"))
    host = settings.target.host.label
    node = settings.slurm is not None
    return traffic(host, settings.transport, declared, bool(settings.kernel_argv), node=node)


def _read_kernel_json(spec: RemoteSpec) -> dict[str, Any]:
    try:
        data = json.loads((Path(spec.resource_dir) / "kernel.json").read_text())
    except (OSError, ValueError):
        return spec.spec
    return data if isinstance(data, dict) else spec.spec


def _remote_command(config: dict[str, Any]) -> str:
    argv = settings_from_config(config).argv()
    return " ".join(a if _PLAIN.match(a) else shlex.quote(a) for a in argv)
