"""Command-line flags every benchmark spells the same way, and the command line it echoes.

Each helper adds one flag to an ``argparse`` parser, so a script keeps its own defaults (the
recorded commands in ``RESULTS.md`` keep working) while the flags mean one thing everywhere:

* ``--quick``: tiny sizes for a smoke run (seconds), never a recorded figure;
* ``--seed N`` / ``--seeds N ...``: data split, initialization and draw seeds;
* ``--threads N``: ``torch.set_num_threads`` (default 1: on a machine whose cores are shared,
  multi-threaded kernels stall and timings mean nothing; 0 keeps torch's default);
* ``--out PATH``: where the results go.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch


def add_quick(parser: argparse.ArgumentParser, help: str = "tiny sizes for a smoke run (seconds)") -> None:
    parser.add_argument("--quick", action="store_true", help=help)


def add_seed(parser: argparse.ArgumentParser, default: int = 0) -> None:
    parser.add_argument("--seed", type=int, default=default, help=f"random seed (default {default})")


def add_seeds(parser: argparse.ArgumentParser, default: Sequence[int], nargs: int | str = "+") -> None:
    parser.add_argument("--seeds", type=int, nargs=nargs, default=list(default),
                        help=f"one run per seed (default {' '.join(map(str, default))})")


def add_threads(parser: argparse.ArgumentParser, default: int | None = 1) -> None:
    parser.add_argument("--threads", type=int, default=default,
                        help=f"torch CPU threads (default {default}; 0 = torch's default)")


def add_out(parser: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    parser.add_argument("--out", default=default, help=help)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is 0 or None (torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """``"python -m benchmarks.<module> <args>"``: what to type to run this again."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", f"benchmarks.{module}", *args])


__all__ = ["add_out", "add_quick", "add_seed", "add_seeds", "add_threads", "command_line", "set_threads"]
