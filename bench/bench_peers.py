"""Benchmark a local ipykernel, remote-ssh-provisioner and sshpyk, in one run.

Default: the jump topology a user has between a laptop and a GPU server (``topology.py``,
needs root): sshds in network namespaces for a bastion, a second jump host and a target, and
a relay that delays the traffic between this machine and the bastion. For each one-way delay
(``--delays``, default 0 and 20 ms) one table: a local kernel, this package to the bastion
(``direct``), to the target through 1 and 2 jump hosts, and sshpyk through the bastion
(``peers_jump.py``). ``--loopback``: the earlier comparison on one loopback sshd
(``peers_loopback.py``).

    python3 bench/bench_peers.py [--quick] [--delays 0,20] [--loopback] [--json PATH]

Only numbers are printed, nothing is asserted. Every wait is bounded, and everything the
script starts (namespaces, sshds, relays, kernels, ControlMasters, temp dirs) is removed on
exit, Ctrl-C, SIGTERM or error. The kernel helpers (start, round trip, stream, interrupt,
shutdown) come from ``bench_kernels.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def delays(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ms, got {text!r}") from None
    if not values or any(v < 0 or v > 1000 for v in values):
        raise argparse.ArgumentTypeError("delays must be between 0 and 1000 ms")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--delays",
        type=delays,
        default=[0.0, 20.0],
        metavar="MS,MS",
        help="one-way delays between this machine and the bastion, one table each (default 0,20)",
    )
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="the comparison on one loopback sshd instead (no namespaces, no root needed)",
    )
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.loopback:
        import peers_loopback

        return peers_loopback.main(args)
    import peers_jump

    return peers_jump.main(args)


if __name__ == "__main__":
    sys.exit(main())
