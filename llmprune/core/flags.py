"""Parsers of command-line values shared by the CLI and the solvers' option declarations."""

from __future__ import annotations

import argparse


def positive_int(value: str) -> int:
    """argparse ``type``: an integer >= 1."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return v
