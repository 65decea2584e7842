"""The kernelspec subcommands: ``add``, ``list``, ``delete``, and ``show`` (in show_command.py).

They only read and write kernelspecs (:mod:`.kernelspec`) and resolve targets
(:mod:`.target`); nothing here opens a connection.
"""

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
from .errors import ConfigError
from .kernelspec import (
    build_spec,
    check_slug,
    find_spec,
    install_spec,
    list_remote_specs,
    on_search_path,
    remove_spec,
    slugify,
    write_spec_dir,
)
from .show_command import run_show
from .target import config_paths

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_RAW = argparse.RawDescriptionHelpFormatter

ADD_EPILOG = """\
examples:
  %(prog)s --endpoint ubuntu@192.0.2.10:22 -J gw@bastion.example.com:3223 --name "Remote CUDA"
  %(prog)s --endpoint gpu --name "GPU box" --python /opt/conda/bin/python
  %(prog)s --endpoint gpu --name "Remote R" --language R \\
      --kernel-argv "R --slave -e IRkernel::main() --args {connection_file}"
  %(prog)s --endpoint gpu --name "GPU box" --out build/   # write, do not install

The spec is checked here (host syntax, config keys, files), but no connection is made;
`remote_kernel check` tests the connection. kernel.json is plain text: put no secret in
--env, use the ssh config, ssh-agent or a key file instead.
"""


def register(subparsers: Any) -> None:
    """Add the ``add``, ``list``, ``show`` and ``delete`` subcommands."""
    add = subparsers.add_parser(
        "add",
        help="create and install a remote kernelspec",
        description="Create a kernelspec that runs its kernel on a remote host over SSH, and "
        "install it where Jupyter finds it (by default for the current user).",
        epilog=ADD_EPILOG,
        formatter_class=_RAW,
    )
    add.add_argument(
        "--endpoint",
        required=True,
        metavar="[USER@]HOST[:PORT]",
        help="the remote host, or a Host alias from the ssh config",
    )
    add.add_argument(
        "-J",
        "--jump",
        action="append",
        default=[],
        metavar="HOP[,HOP...]",
        help="jump host(s) in order, like ssh -J; repeat or comma-separate ('none': no jump "
        "host, even if the ssh config sets ProxyJump)",
    )
    add.add_argument("--name", help="display name in the kernel picker (default: the endpoint)")
    add.add_argument(
        "--kernel-name",
        metavar="SLUG",
        help="kernelspec directory name (default: from --name, e.g. 'Remote CUDA' -> "
        "remote_cuda); lowercase letters, digits, '_' and '.'",
    )
    add.add_argument("--python", metavar="PATH", help="remote interpreter (default: python3)")
    add.add_argument(
        "--kernel-argv",
        metavar="COMMAND",
        help="remote command of a non-ipykernel kernel, containing {connection_file}",
    )
    add.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the remote kernel; repeat for more",
    )
    add.add_argument("--cwd", metavar="DIR", help="remote working directory (default: home)")
    add.add_argument(
        "--path-map",
        action="append",
        default=[],
        metavar="LOCAL=REMOTE",
        help="run notebooks under local directory LOCAL in the matching directory under "
        "REMOTE (e.g. ~/work/proj=~/projects/proj); repeat for more",
    )
    add.add_argument(
        "--upload",
        action="append",
        default=[],
        metavar="PATH",
        help="file or directory (relative to the notebook's directory) copied to the kernel's "
        "working directory before each start; repeat for more",
    )
    add.add_argument(
        "--curve",
        action="store_true",
        help="the --kernel-argv kernel supports CurveZMQ encryption: declare it in the spec, so "
        "that its tcp traffic is encrypted (ipykernel specs always declare it)",
    )
    add.add_argument("--language", default="python", help="kernel language (default: python)")
    add.add_argument("--identity-file", metavar="FILE", help="private key for every hop")
    add.add_argument(
        "--known-hosts", metavar="FILE", help="known_hosts file (default: ~/.ssh/known_hosts)"
    )
    add.add_argument(
        "--ssh-config", metavar="FILE", help="ssh config file to read (default: ~/.ssh/config)"
    )
    where = add.add_mutually_exclusive_group()
    where.add_argument(
        "--user", action="store_true", help="install for the current user (the default)"
    )
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this Python's prefix ({sys.prefix})",
    )
    where.add_argument("--prefix", metavar="DIR", help="install into DIR/share/jupyter/kernels")
    add.add_argument("--replace", action="store_true", help="overwrite a kernelspec of that name")
    slurm_options.add_arguments(add)
    add.add_argument(
        "--out",
        metavar="DIR",
        help="write the spec directory DIR/<kernel-name> instead of installing it",
    )
    add.set_defaults(run=run_add)

    lst = subparsers.add_parser(
        "list",
        help="list the installed remote kernelspecs",
        description="List the installed kernelspecs that run remotely (other kernels are left "
        "out; `jupyter kernelspec list` shows all).",
    )
    lst.add_argument("--json", action="store_true", help="print a JSON list")
    lst.set_defaults(run=run_list)

    show = subparsers.add_parser(
        "show",
        help="show a remote kernelspec and the hosts it reaches",
        description="Show a remote kernelspec (kernel.json and where it is) and its target as "
        "resolved with the ssh config: every hop's HostName, port, user, keys and known_hosts, "
        "and the equivalent ssh command. No connection is made.",
    )
    show.add_argument("name", metavar="NAME", help="kernel name (slug) or display name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=run_show)

    delete = subparsers.add_parser(
        "delete",
        help="remove a remote kernelspec",
        description="Remove an installed remote kernelspec, by kernel name (slug) or display "
        "name. Other kinds of kernelspec are refused: use `jupyter kernelspec remove`.",
    )
    delete.add_argument("name", metavar="NAME", help="kernel name (slug) or display name")
    delete.set_defaults(run=run_delete)


# -- add -------------------------------------------------------------------------------


def run_add(args: argparse.Namespace) -> int:
    """Build the spec from the options, then install it (or write it with --out)."""
    name = args.name if args.name is not None else args.endpoint
    slug = check_slug(args.kernel_name) if args.kernel_name else slugify(name)
    jumps = [hop.strip() for value in args.jump for hop in value.split(",") if hop.strip()]
    extra: dict[str, Any] = {}
    if args.kernel_argv:
        extra["kernel_argv"] = _split_command(args.kernel_argv)
    if args.identity_file:
        extra["identity_file"] = _local_path(args.identity_file, "--identity-file")
    if args.known_hosts:
        extra["known_hosts"] = _local_path(args.known_hosts, None)
    if args.path_map:
        extra["path_map"] = _parse_pairs(args.path_map, "--path-map", "LOCAL=REMOTE")
    if args.upload:
        extra["upload"] = list(args.upload)
    if args.ssh_config:
        extra["ssh_config"] = _local_path(args.ssh_config, None)
        config_paths(extra["ssh_config"])  # fails now if the file is missing
    slurm = slurm_options.config_from_args(args)
    if slurm is not None:
        extra["slurm"] = slurm
    spec = build_spec(
        name,
        args.endpoint,
        jumps,
        python=args.python,
        env=_parse_env(args.env),
        cwd=args.cwd,
        language=args.language,
        extra_config=extra,
        curve=args.curve,
    )
    summary = _summary(name, args.endpoint, jumps)
    if args.out:
        return _write_out(spec, slug, summary, args)
    user = args.user or not (args.sys_prefix or args.prefix)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install_spec(spec, slug, user=user, prefix=prefix, replace=args.replace)
    print(f"Installed kernelspec {slug} ({summary}) in {path}")
    if not on_search_path(path):
        share = os.path.dirname(os.path.dirname(path))
        print(
            f"note: Jupyter does not look in {os.path.dirname(path)}; add {share} to "
            "JUPYTER_PATH so that it finds this kernel",
            file=sys.stderr,
        )
    return 0


def _write_out(spec: dict[str, Any], slug: str, summary: str, args: argparse.Namespace) -> int:
    out = Path(args.out)
    target = out / slug
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out} is not a directory; give a directory to write into")
    if (target / "kernel.json").exists() and not args.replace:
        raise ConfigError(f"{target} already exists; use --replace to overwrite it")
    try:
        write_spec_dir(spec, target)
    except OSError as exc:
        raise ConfigError(
            f"cannot write kernelspec {slug} in {args.out}: {exc.strerror or exc}; give a "
            f"directory you can write to with --out"
        ) from None
    where = (
        "--sys-prefix"
        if args.sys_prefix
        else f"--prefix {shlex.quote(args.prefix)}"
        if args.prefix
        else "--user"
    )
    print(f"Wrote kernelspec {slug} ({summary}) in {target}")
    print(f"Install it with: jupyter kernelspec install {where} {shlex.quote(str(target))}")
    return 0


def _split_command(command: str) -> list[str]:
    """``--kernel-argv``: a command line split as a POSIX shell would."""
    try:
        return shlex.split(command)
    except ValueError as exc:
        raise ConfigError(
            f"invalid --kernel-argv {command!r}: {str(exc).lower()}; quote it as you would "
            f"in a shell"
        ) from None


def _parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise ConfigError(
                f"invalid --env {item!r}: expected NAME=VALUE, NAME made of letters, digits "
                "and '_' (not starting with a digit)"
            )
        env[key] = value
    return env


def _parse_pairs(items: list[str], option: str, form: str) -> dict[str, str]:
    """``--path-map LOCAL=REMOTE`` values: LOCAL made absolute (``~`` kept)."""
    pairs: dict[str, str] = {}
    for item in items:
        local, sep, remote = item.partition("=")
        if not sep or not local.strip() or not remote.strip():
            raise ConfigError(f"invalid {option} {item!r}: expected {form}")
        pairs[_local_path(local.strip(), None)] = remote.strip()
    return pairs


def _local_path(path: str, option: str | None) -> str:
    """An absolute path (``~`` kept, so the spec stays portable); ``option``: must exist."""
    if not path.startswith("~"):
        path = os.path.abspath(path)
    if option and not Path(path).expanduser().is_file():
        raise ConfigError(f"{option} {path} does not exist")
    return path


def _summary(name: str, host: str, jumps: list[str]) -> str:
    via = f" via {', '.join(jumps)}" if jumps else ""
    return f"{name} -> {host}{via}"


# -- list, show, delete ------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    """Print the remote kernelspecs in a readable layout, or as JSON."""
    specs = list_remote_specs()
    if args.json:
        print(json.dumps([s.to_json() for s in specs], indent=2))
        return 0
    if not specs:
        print("No remote kernelspecs installed.")
        return 0
    for spec in specs:
        print(f"slug: {spec.slug}")
        print(f"  name: {spec.display_name}")
        print(f"  endpoint: {spec.endpoint}")
        if spec.jumps:
            print(f"  jump: {', '.join(spec.jumps)}")
        print("---")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    """Remove one remote kernelspec; other kinds are refused by :func:`find_spec`."""
    spec = find_spec(args.name, removing=True)
    path = remove_spec(spec)
    print(f"Removed kernelspec {spec.slug} ({path})")
    return 0
