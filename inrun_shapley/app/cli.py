"""The ``inrun-shapley`` console script.

Subcommands live in one table, :data:`COMMANDS`: each entry is a :class:`Command` holding its
help line, a function that adds its arguments to an ``argparse`` parser, and a function that
runs it and returns the exit code. Adding a subcommand is adding one entry. Everything heavier
than ``argparse`` (numpy, the value log, plotting, Lightning) is imported inside the runner, so
``--help`` and ``--version`` import none of it.

Exit codes: 0 on success, 2 on any error (bad arguments, missing or corrupt log, unwritable
output, an error of the library), reported as one line on stderr starting with ``error:`` that
names command-line flags (``--n-ids``), never a traceback.

Examples::

    inrun-shapley demo --out demo/
    inrun-shapley prune runs/digits.shapley --fraction 0.2 --out keep.txt
    inrun-shapley prune runs/lm.shapley --fraction auto --documents doc_of_seq.npy --out keep_docs.txt
    inrun-shapley report runs/digits.shapley --out report/ --csv values.csv
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, NamedTuple, Sequence

from inrun_shapley._version import __version__
from inrun_shapley.app._cli_common import UsageError, read_ids, write_ids
from inrun_shapley.app.report import report_arguments, report_run

PROG = "inrun-shapley"


class Command(NamedTuple):
    """One subcommand: help line, argument declaration, and runner returning an exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that reports usage errors as exceptions instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _normalizations() -> tuple[str, ...]:
    from inrun_shapley.log import NORMALIZATIONS

    return tuple(NORMALIZATIONS)


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log", help="value log directory (or a directory of rank* logs)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument(
        "--fraction",
        help="fraction of seen samples to drop, in [0, 1), or 'auto': drop every sample with a negative "
        "value (the negative-value rule of In-Run Data Shapley)",
    )
    rule.add_argument("--keep-top", type=int, help="keep only this many highest-valued seen samples")
    p.add_argument("--drop-negative", action="store_true", help="also drop samples with value < 0")
    p.add_argument("--out", required=True, help="output file of kept ids: .npy, else one id a line")
    p.add_argument(
        "--normalize",
        choices=_normalizations(),
        default="step_std",
        help="score used for ranking (default: step_std, per-step standardized sums)",
    )
    p.add_argument(
        "--n-ids", type=int, help="dataset size, so never-seen ids above the log's max are kept"
    )
    p.add_argument("--unseen", choices=("keep", "drop"), default="keep", help="never-seen ids")
    p.add_argument(
        "--documents",
        help="document id of each logged id (.npy or text, one a line, indexed by id): prune whole documents "
        "by the sum of their sequences' values and write the kept document ids",
    )
    p.add_argument(
        "--labels",
        help="labels indexed by id (.npy or text): for --class-balanced, and to warn when the plan "
        "drops over twice the overall fraction of a class or empties one",
    )
    p.add_argument(
        "--class-balanced",
        action="store_true",
        help="drop the fraction within each class (recommended on a clean dataset, whose "
        "lowest-valued samples cluster in a few classes)",
    )


def _parse_fraction(text: str | None) -> float | str | None:
    """``--fraction``: None, ``"auto"`` or a number in [0, 1) (1 would keep no scored sample)."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise UsageError(
            f"--fraction must be a number in [0, 1) or 'auto' (drop every sample with a negative value), got {text!r}"
        )
    if value == 1.0:
        raise UsageError(
            "--fraction 1 drops every scored sample, so the keep file would list none of them: pass the share "
            "to drop, below 1 (e.g. --fraction 0.2), or --keep-top K to keep the K most helpful"
        )
    return value


def _check_prune_arguments(args: argparse.Namespace) -> None:
    args.fraction = _parse_fraction(args.fraction)
    if args.keep_top is not None and args.keep_top < 0:
        raise UsageError(f"--keep-top must be >= 0, got {args.keep_top}")
    if args.fraction is None and args.keep_top is None and not args.drop_negative:
        raise UsageError("nothing to prune: pass --fraction, --keep-top or --drop-negative")
    if args.n_ids is not None and args.n_ids < 0:
        raise UsageError(f"--n-ids must be >= 0, got {args.n_ids}")
    if args.class_balanced and args.labels is None:
        raise UsageError("--class-balanced needs --labels (a label per id, .npy or text)")
    if args.class_balanced and args.fraction is None and args.keep_top is None:
        raise UsageError("--class-balanced applies to --fraction or --keep-top; pass one of them")


def _prune_run(args: argparse.Namespace) -> int:
    import warnings

    from inrun_shapley.log import ShapleyLog
    from inrun_shapley.log.accumulator import dense_allowed
    from inrun_shapley.pruning import prune

    _check_prune_arguments(args)
    log = ShapleyLog.load(args.log, progress=True)
    if args.documents is not None:
        return _prune_documents(args, log)
    dense = dense_allowed(log.max_id, log.ids.size)
    if not dense and args.unseen == "keep" and args.n_ids is None:
        raise UsageError(
            f"{args.log} has sparse ids (largest {log.max_id}, {log.ids.size} seen), so the ids it never saw "
            "cannot be listed: pass --unseen drop to write the kept seen ids, or --n-ids N if the dataset's "
            "ids are 0..N-1"
        )
    labels = read_ids(args.labels, "--labels") if args.labels else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep = prune(
            log,
            fraction=args.fraction,
            drop_negative=args.drop_negative,
            keep_top=args.keep_top,
            normalize=args.normalize,
            labels=labels,
            class_balanced=args.class_balanced,
            ids=args.n_ids,
            unseen=args.unseen,
        )
    for w in caught:
        print(f"warning: {_one_line(w.message)}", file=sys.stderr)
    total = args.n_ids if args.n_ids is not None else (log.max_id + 1 if dense else log.ids.size)
    out = write_ids(args.out, keep)
    print(
        f"kept {keep.size} of {total} ids ({total - keep.size} dropped) -> {out}\n"
        f"ranked by {log.ranking(args.normalize, 'mean')} (lowest helpfulness dropped first)"
    )
    return 0


def _prune_documents(args: argparse.Namespace, log) -> int:
    """``prune --documents``: rank documents by the sum of their sequences' values."""
    import warnings

    from inrun_shapley.documents import document_values
    from inrun_shapley.pruning import prune

    doc_of = read_ids(args.documents, "--documents")
    values = document_values(log, doc_of, n_docs=args.n_ids, normalize=args.normalize)
    labels = read_ids(args.labels, "--labels") if args.labels else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep = prune(values, fraction=args.fraction, drop_negative=args.drop_negative, keep_top=args.keep_top,
                     labels=labels, class_balanced=args.class_balanced, unseen=args.unseen)
    for w in caught:
        print(f"warning: {_one_line(w.message)}", file=sys.stderr)
    out = write_ids(args.out, keep)
    print(
        f"kept {keep.size} of {values.size} documents ({values.size - keep.size} dropped) -> {out}\n"
        f"ranked by the sum over each document's sequences of the {log.ranking(args.normalize, 'mean')} "
        "(lowest dropped first)"
    )
    return 0


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="inrun_shapley_demo", help="output folder (plots, logs, summary.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run per seed")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 12)")
    p.add_argument("--flip", type=float, default=0.2, help="fraction of training labels flipped")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests (2 epochs)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _demo_run(args: argparse.Namespace) -> int:
    if not 0.0 < args.flip < 1.0:
        raise UsageError(f"--flip must be between 0 and 1, got {args.flip}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    from inrun_shapley.app.demo import DemoConfig, run_demo

    cfg = DemoConfig(seeds=tuple(args.seeds), flip=args.flip, progress=not args.no_progress)
    if args.quick:
        cfg.epochs, cfg.fractions = 2, (0.2,)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    run_demo(args.out, cfg)
    return 0


# --------------------------------------------------------------------------------------------
# table and entry point
# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "demo": Command(
        "train on digits with 20% flipped labels, find them with in-run values, prune, retrain",
        _demo_arguments,
        _demo_run,
    ),
    "prune": Command(
        "write the ids to keep after dropping the lowest-valued samples",
        _prune_arguments,
        _prune_run,
    ),
    "report": Command(
        "summarize a value log, list its most and least valuable samples, plot and export them",
        report_arguments,
        report_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = _Parser(prog=PROG, description="In-Run Data Shapley values: inspect and prune.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        # help= is %-formatted by argparse, description= is printed as is
        cmd.add_arguments(sub.add_parser(name, help=cmd.help.replace("%", "%%"), description=cmd.help))
    return parser


# Library keywords -> the flags that set them, for messages raised below the CLI.
_FLAGS = {
    "fraction": "--fraction",
    "keep_top": "--keep-top",
    "drop_negative": "--drop-negative",
    "class_balanced": "--class-balanced",
    "labels": "--labels",
    "ids": "--n-ids",
    "unseen": "--unseen",
    "normalize": "--normalize",
    "query": "--query",
    "doc_of": "--documents",
    "n_docs": "--n-ids",
}
_KEYWORD = re.compile(r"\b(" + "|".join(_FLAGS) + r")=(True\b)?")
_LEADING = re.compile(r"^(" + "|".join(_FLAGS) + r")\b(?= must| has)")


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, with library keywords (``ids=``) as CLI flags."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _KEYWORD.sub(lambda m: _FLAGS[m[1]] + ("" if m[2] else " "), text)
    return _LEADING.sub(lambda m: _FLAGS[m[1]], text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script.

    Args:
        argv: arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 on an error (reported as one ``error:`` line on stderr).
    """
    from inrun_shapley.errors import AttributionError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        print("error: a command is required: " + ", ".join(COMMANDS), file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except (AttributionError, UsageError, OSError, ValueError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: still one line, and say so
        print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (please report this)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
