"""``inrun-shapley report``: summarize a value log, rank its samples, plot and export them.

The ranking is the log's helpfulness (:meth:`ShapleyLog.helpfulness`): its per-sample score
under ``--normalize`` (default ``step_std``: the sum of the sample's per-step values, each step
standardized by that step's spread, docs/math.md §1.4) times the ``helpful_sign`` the log
declares, so higher = more helpful whatever the log holds (In-Run Shapley values: +1; adjoint
influence on a loss: -1). It is averaged over the queries of a per-query log, or taken for one
query with ``--query Q``. This is the default ranking of :meth:`ShapleyLog.top` and of
``prune`` too; the printed summary names it. A log whose ``helpful_sign`` is null is refused.
Everything is read per seen id, so logs with sparse ids (hashes, global row numbers) work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from inrun_shapley.app._cli_common import UsageError, read_ids

if TYPE_CHECKING:
    import numpy as np


def report_arguments(p: argparse.ArgumentParser) -> None:
    from inrun_shapley.log import NORMALIZATIONS

    p.add_argument("log", help="value log directory (or a directory of rank* logs)")
    p.add_argument("--out", help="directory for the plots (PNG); none written without it")
    p.add_argument("--csv", help="write a per-sample table (id, score, raw value, count) to this file")
    p.add_argument("--top", type=int, default=5, help="how many most/least valuable ids to list")
    p.add_argument(
        "--normalize", choices=NORMALIZATIONS, default="step_std", help="score used for ranking"
    )
    p.add_argument(
        "--query",
        type=int,
        help="per-query logs: rank by this query's column (0-based) instead of the mean over queries",
    )
    p.add_argument(
        "--highlight",
        help="ids to mark (.npy or text), e.g. known flipped labels (the demo writes "
        "seed*/flipped_ids.txt): overlaid in the histogram, with the AUC of low scores for finding them",
    )


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _stats_rows(name: str, x: "np.ndarray") -> list[tuple[str, str]]:
    import numpy as np

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


def _column(log, args: argparse.Namespace):
    """The query column the tables rank by: ``"mean"`` or the checked ``--query``."""
    if args.query is None:
        return "mean"
    if not log.n_queries:
        raise UsageError("--query needs a per-query log; this log holds one value per sample")
    if not 0 <= args.query < log.n_queries:
        raise UsageError(f"--query must be in [0, {log.n_queries}) for this log, got {args.query}")
    return args.query


def write_csv(path: str | Path, ids, score, raw, counts) -> Path:
    """One row per seen sample, by id: ``id,score,raw_value,count``.

    Args:
        path: the CSV file (its folder is created).
        ids: ``[n]`` sample ids; score: ``[n]`` ranking score (helpfulness: higher = more
            helpful); raw: ``[n]`` raw value sum as logged; counts: ``[n]`` appearances.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["id,score,raw_value,count"]
    lines += [f"{int(i)},{s:.10g},{r:.10g},{int(c)}" for i, s, r, c in zip(ids, score, raw, counts)]
    path.write_text("\n".join(lines) + "\n")
    return path


def report_run(args: argparse.Namespace) -> int:
    import numpy as np

    from inrun_shapley.log import ShapleyLog

    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    marked_ids = read_ids(args.highlight, "--highlight") if args.highlight else None
    log = ShapleyLog.load(args.log, progress=True)
    column = _column(log, args)
    h = log.header
    ids = log.ids
    rank = log.helpfulness(args.normalize, query=column, ids=ids, purpose="report")
    raw = log.scores("none", query=column, ids=ids)
    std = log.scores("step_std", query=column, ids=ids)
    totals = log.totals()
    counts = totals["count"]
    ranking = log.ranking(args.normalize, column)
    rows: list[tuple[str, str]] = [
        ("log", str(args.log)),
        ("format version", str(h.get("format_version"))),
        ("steps", f"{h.get('n_steps', 0)} (steps {h.get('first_step')}..{log.last_step})"),
        ("samples seen", f"{ids.size} (max id {int(ids[-1]) if ids.size else '-'})"),
        ("appearances/sample", _fmt(float(counts.mean())) if ids.size else "-"),
        ("queries", (f"{log.n_queries} ({'averaged' if column == 'mean' else f'query {column}'} below)"
                     if log.n_queries else "1 (mean loss)")),
        ("per-step records", "yes" if log.steps is not None else "no"),
        ("step std", f"{h.get('std_source')} ({h.get('degenerate_steps', 0)} degenerate steps)"),
        ("ranked by", ranking + " (higher = more helpful)"),
        ("score meaning", f"{log.score['kind']}: positive = {log.score['positive_means']}"),
    ]
    rows += _stats_rows("value (raw)", raw)
    rows += _stats_rows("value (step_std)", std)
    if totals.get("group_sum") is not None:
        sums = totals["group_sum"].sum(axis=0)
        for name, s in zip(log.group_names or [], sums):
            rows.append((f"group {name}", f"sum {_fmt(float(s))}"))
    marked = np.isin(ids, marked_ids) if marked_ids is not None else None
    if marked is not None and marked.any() and (~marked).any():
        from inrun_shapley.metrics import roc_auc

        rows.append(("AUC(low score→marked)", f"{roc_auc(-rank, marked):.3f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    if ids.size and args.top:
        order = np.lexsort((ids, -rank))
        k = min(args.top, ids.size)
        w = max(10, len(str(int(ids[-1]))))
        for title, sel in (("most valuable", order[:k]), ("least valuable", order[::-1][:k][::-1])):
            print(f"\n{title} (ranked by {ranking}):")
            print(f"  {'id':>{w}}  {'helpful':>11}  {'raw value':>11}  {'count':>6}")
            for j in sel:
                print(f"  {int(ids[j]):>{w}}  {rank[j]:>11.4g}  {raw[j]:>11.4g}  {int(counts[j]):>6}")

    if args.csv:
        print(f"\nwrote {write_csv(args.csv, ids, rank, raw, counts)} (score: {ranking})")
    if args.out:
        _plots(log, ids, rank, marked, ranking, args)
    return 0


def _plots(log, ids, rank, marked, ranking: str, args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from inrun_shapley.app import plots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = None if marked is None else {"marked": marked, "other": ~marked}
    steps, totals = log.step_totals()
    jobs = [
        lambda: plots.plot_value_histogram(
            rank,
            out / "value_histogram.png",
            groups=groups,
            xlabel=f"helpfulness ({ranking}; higher = more helpful)",
        ),
        lambda: plots.plot_cumulative_value(rank, out / "cumulative_value.png"),
        lambda: plots.plot_step_values(steps, totals, out / "step_values.png"),
    ]
    if ids.size:
        jobs.append(lambda: plots.plot_top_bottom(ids, rank, out / "top_bottom.png", k=args.top or 10))
    written = [job() for job in tqdm(jobs, desc="plots", disable=None)]
    print("\nwrote " + ", ".join(str(p) for p in written))
