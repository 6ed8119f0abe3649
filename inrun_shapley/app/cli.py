"""The ``inrun-shapley`` console script.

Subcommands live in one table, :data:`COMMANDS`: each entry is a :class:`Command` holding its
help line, a function that adds its arguments to an ``argparse`` parser, and a function that
runs it and returns the exit code. Adding a subcommand is adding one entry.

Exit codes: 0 on success, 2 on a usage error or a failure the user can fix (missing or corrupt
log, bad fraction, unwritable output), with one line on stderr starting with ``error:``.

Examples::

    inrun-shapley prune runs/digits.shapley --fraction 0.2 --out keep.txt
    inrun-shapley report runs/digits.shapley --out report/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from inrun_shapley.errors import AttributionError
from inrun_shapley.log import NORMALIZATIONS, ShapleyLog

PROG = "inrun-shapley"


class Command(NamedTuple):
    """One subcommand: help line, argument declaration, and runner returning an exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that reports usage errors as exceptions instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _read_ids(path: str) -> np.ndarray:
    """Ids (or labels) from a ``.npy`` file or a text file with one integer per line."""
    p = Path(path)
    if not p.is_file():
        raise OSError(f"{p}: no such file")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            arr = np.loadtxt(p, dtype=np.int64, ndmin=1)
    except ValueError as exc:
        raise OSError(f"{p}: cannot read integers ({exc})") from exc
    return np.asarray(arr).ravel()


def _write_ids(path: str, ids: np.ndarray) -> Path:
    p = Path(path)
    if p.suffix == ".npy":
        np.save(p, ids.astype(np.int64))
    else:
        p.write_text("".join(f"{int(i)}\n" for i in ids))
    return p


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log", help="value log directory (or a directory of rank* logs)")
    p.add_argument("--fraction", type=float, help="fraction of seen samples to drop, in [0, 1]")
    p.add_argument("--keep-top", type=int, help="keep only this many highest-valued seen samples")
    p.add_argument("--drop-negative", action="store_true", help="also drop samples with value < 0")
    p.add_argument("--out", required=True, help="output file of kept ids: .npy, else one id a line")
    p.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="step_std",
        help="score used for ranking (default: step_std, per-step standardized sums)",
    )
    p.add_argument(
        "--n-ids", type=int, help="dataset size, so never-seen ids above the log's max are kept"
    )
    p.add_argument("--unseen", choices=("keep", "drop"), default="keep", help="never-seen ids")
    p.add_argument("--labels", help="labels indexed by id (.npy or text) for --class-balanced")
    p.add_argument(
        "--class-balanced", action="store_true", help="drop the fraction within each class"
    )


def _prune_run(args: argparse.Namespace) -> int:
    from inrun_shapley.prune import prune

    log = ShapleyLog.load(args.log, progress=True)
    labels = _read_ids(args.labels) if args.labels else None
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
    total = args.n_ids if args.n_ids is not None else log.counts.shape[0]
    out = _write_ids(args.out, keep)
    print(f"kept {keep.size} of {total} ids ({total - keep.size} dropped) -> {out}")
    return 0


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log", help="value log directory (or a directory of rank* logs)")
    p.add_argument("--out", help="directory for the plots (PNG); none written without it")
    p.add_argument("--top", type=int, default=5, help="how many most/least valuable ids to list")
    p.add_argument(
        "--normalize", choices=NORMALIZATIONS, default="step_std", help="score used for ranking"
    )
    p.add_argument(
        "--highlight",
        help="ids to mark (.npy or text), e.g. known flipped labels: overlaid in the histogram, "
        "with the AUC of low scores for finding them",
    )


def _stats_rows(name: str, x: np.ndarray) -> list[tuple[str, str]]:
    if x.size == 0:
        return [(name, "-")]
    return [
        (
            name,
            f"sum {_fmt(x.sum())}  mean {_fmt(x.mean())}  std {_fmt(x.std())}  "
            f"min {_fmt(x.min())}  median {_fmt(float(np.median(x)))}  max {_fmt(x.max())}  "
            f"negative {100 * float((x < 0).mean()):.1f}%",
        )
    ]


def _report_run(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise _UsageError(f"--top must be >= 0, got {args.top}")
    log = ShapleyLog.load(args.log, progress=True)
    h = log.header
    ids = log.ids
    raw = log.scores("none", query="mean")[ids]
    std = log.scores("step_std", query="mean")[ids]
    rank = log.scores(args.normalize, query="mean")[ids]
    rows: list[tuple[str, str]] = [
        ("log", str(args.log)),
        ("format version", str(h.get("format_version"))),
        ("steps", f"{h.get('n_steps', 0)} (steps {h.get('first_step')}..{log.last_step})"),
        ("samples seen", f"{ids.size} (max id {int(ids[-1]) if ids.size else '-'})"),
        ("appearances/sample", _fmt(float(log.counts[ids].mean())) if ids.size else "-"),
        ("queries", f"{log.n_queries} (averaged below)" if log.n_queries else "1 (mean loss)"),
        ("per-step records", "yes" if log.steps is not None else "no"),
        ("step std", f"{h.get('std_source')} ({h.get('degenerate_steps', 0)} degenerate steps)"),
    ]
    rows += _stats_rows("value (raw)", raw)
    rows += _stats_rows("value (step_std)", std)
    if log.group_values is not None:
        sums = log.group_values[ids].sum(axis=0)
        for name, s in zip(log.group_names or [], sums):
            rows.append((f"group {name}", f"sum {_fmt(float(s))}"))
    if args.highlight and ids.size:
        from inrun_shapley.metrics import roc_auc

        marked = np.isin(ids, _read_ids(args.highlight))
        if marked.any() and (~marked).any():
            rows.append(("AUC(low score→marked)", f"{roc_auc(-rank, marked):.3f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    if ids.size and args.top:
        order = np.lexsort((ids, -rank))
        k = min(args.top, ids.size)
        for title, sel in (("most valuable", order[:k]), ("least valuable", order[::-1][:k][::-1])):
            print(f"\n{title} ({args.normalize}):")
            print(f"  {'id':>10}  {'score':>11}  {'raw value':>11}  {'count':>6}")
            for j in sel:
                i = int(ids[j])
                print(f"  {i:>10}  {rank[j]:>11.4g}  {raw[j]:>11.4g}  {int(log.counts[i]):>6}")

    if args.out:
        from tqdm.auto import tqdm

        from inrun_shapley.app import plots

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        groups = None
        if args.highlight:
            groups = {"marked": np.isin(ids, _read_ids(args.highlight))}
            groups["other"] = ~groups["marked"]
        steps, totals = log.step_totals()
        jobs = [
            lambda: plots.plot_value_histogram(
                rank,
                out / "value_histogram.png",
                groups=groups,
                xlabel=f"value ({args.normalize}; positive = reduced validation loss)",
            ),
            lambda: plots.plot_cumulative_value(rank, out / "cumulative_value.png"),
            lambda: plots.plot_step_values(steps, totals, out / "step_values.png"),
        ]
        if ids.size:
            jobs.append(
                lambda: plots.plot_top_bottom(ids, rank, out / "top_bottom.png", k=args.top or 10)
            )
        written = [job() for job in tqdm(jobs, desc="plots", disable=None)]
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="inrun_shapley_demo", help="output folder (plots, logs, summary.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run per seed")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 12)")
    p.add_argument("--flip", type=float, default=0.2, help="fraction of training labels flipped")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests (2 epochs)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _demo_run(args: argparse.Namespace) -> int:
    from inrun_shapley.app.demo import DemoConfig, run_demo

    if not 0.0 < args.flip < 1.0:
        raise _UsageError(f"--flip must be between 0 and 1, got {args.flip}")
    cfg = DemoConfig(seeds=tuple(args.seeds), flip=args.flip, progress=not args.no_progress)
    if args.quick:
        cfg.epochs, cfg.fractions = 2, (0.2,)
    if args.epochs is not None:
        if args.epochs < 1:
            raise _UsageError(f"--epochs must be >= 1, got {args.epochs}")
        cfg.epochs = args.epochs
    run_demo(args.out, cfg)
    return 0


# --------------------------------------------------------------------------------------------
# table and entry point
# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "demo": Command(
        "train on digits with 20%% flipped labels, find them with in-run values, prune, retrain",
        _demo_arguments,
        _demo_run,
    ),
    "prune": Command(
        "write the ids to keep after dropping the lowest-valued samples",
        _prune_arguments,
        _prune_run,
    ),
    "report": Command(
        "summarize a value log and plot its value distribution",
        _report_arguments,
        _report_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = _Parser(prog=PROG, description="In-Run Data Shapley values: inspect and prune.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script.

    Args:
        argv: arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 on an error (reported as one ``error:`` line on stderr).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    if args.command is None:
        print("error: a command is required: " + ", ".join(COMMANDS), file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except (AttributionError, _UsageError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
