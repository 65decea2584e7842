"""Placeholder: the `demo` part of the command line (being written)."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add this module's subcommands to the command line."""
