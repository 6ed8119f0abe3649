"""Attribution quality on the LDS harness: every registered method, one table (docs/math.md §11).

Run::

    python -m benchmarks.quality                  # full setup (M=50 retrained models), minutes
    python -m benchmarks.quality --quick          # smoke run (M=8, tiny MLP), seconds
    python -m benchmarks.quality --only grad_dot,exact_if --out benchmarks/RESULTS_quality.md
    python -m benchmarks.quality --only inrun     # our in-run / adjoint / BIF / learned-weights rows

Per method: LDS on the margin (mean ± std over the queries) on the clean setup, flipped-label
detection AUC on the noisy setup (20 % flipped; per-sample value ``sum_q scores[i, q]``, low =
suspicious), wall time and peak resident-memory increase (RSS sampled every 5 ms, relative to
the start of the method) of the clean-setup run. A method that raises is reported as
``failed: <error>``, never dropped.

Adding a method is one line: ``METHODS["my method"] = fn`` with ``fn(setup) -> [n_train, Q]``
scores, positive = including sample i raises query q's margin (see ``peers.py`` for how each
baseline is brought to that convention), e.g.::

    METHODS["in-run Shapley (per query)"] = lambda setup: my_inrun_scores(setup)

Our methods (``ours.py``; its docstring documents how each is brought to that convention): the
per-query in-run values (fixed-state Shapley and SGD-form, two trackers on ONE shared training run
that also records the trajectory), the adjoint pass over that recording, the BIF at large γ, and
the last-checkpoint gradient dot product with learned per-tensor group weights. Lines under the
table note the shared run and each method's settings/diagnostics.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from benchmarks import lds_harness, ours, peers
from benchmarks.common import cli

# name -> fn(setup) -> scores [n_train, Q] (positive = including i raises query q's margin)
METHODS: dict[str, Callable] = {
    "grad dot (TracIn, last ckpt)": peers.grad_dot,
    "TracIn (ckpts)": peers.tracin_checkpoints,
    "exact damped IF (Hessian)": peers.exact_influence,
    "exact damped IF (GGN)": peers.exact_influence_ggn,
    "kronfluence EK-FAC": peers.kronfluence_ekfac,
    "dattri TracIn (ckpts)": peers.dattri_tracin,
    "dattri IF explicit": peers.dattri_if_explicit,
    "dattri TRAK (5 models)": peers.dattri_trak,
    "traker TRAK (5 models)": peers.traker_trak,
    # ours (ours.py): scores positive = including i raises query q's margin, conversions documented there
    "in-run midpoint = default (per-query, one-step)": ours.inrun_midpoint_per_query,  # tracker value = −Δ(−margin)
    "in-run shapley (per-query, one-step)": ours.inrun_shapley_per_query,  # same run, fixed-state
    "in-run shapley, second order (per-query)": ours.inrun_shapley2_per_query,  # same run, order=2
    "in-run sgd-form (per-query)": ours.inrun_sgd_per_query,  # same run, estimator="sgd"
    "adjoint (loo J, default damping)": ours.adjoint_loo,  # f_q = margin, scores as returned
    "BIF (large γ)": ours.bif_large_gamma,  # observable = margin, .influence as returned
    "grad dot, learned group weights": ours.grad_dot_learned_weights,  # query loss = −margin
}
# reference methods of peers.py (``--only ours``) and our library's methods (``--only inrun``)
OURS = ("grad dot (TracIn, last ckpt)", "TracIn (ckpts)", "exact damped IF (Hessian)", "exact damped IF (GGN)")
INRUN = tuple(ours.METHODS)


@dataclass
class Row:
    method: str
    lds: str = "-"
    auc: str = "-"
    seconds: str = "-"
    peak_mb: str = "-"
    status: str = "ok"
    lds_mean: float = float("nan")


class PeakRSS:
    """Peak resident-set-size increase over a block, sampled by a thread every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return "failed: " + (msg[:200] + "…" if len(msg) > 200 else msg)


def run_method(name: str, fn: Callable, setup, noisy) -> Row:
    row = Row(name)
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            scores = np.asarray(fn(setup), dtype=np.float64)
            row.seconds = f"{time.perf_counter() - t0:.1f}"
        row.peak_mb = f"{mem.mb:.0f}"
        if scores.shape != (setup.n_train, setup.n_queries):
            raise ValueError(f"scores shape {scores.shape}, expected {(setup.n_train, setup.n_queries)}")
        if not np.isfinite(scores).all():
            raise ValueError("non-finite scores")
        res = setup.evaluate(scores)
        row.lds, row.lds_mean = f"{res.mean:.3f} ± {res.std:.3f}", res.mean
    except Exception as e:  # a failing method is reported, never dropped
        row.status = _err(e)
        traceback.print_exc(limit=2, file=sys.stderr)
        return row
    if noisy is not None:
        try:
            row.auc = f"{noisy.flip_auc(fn(noisy)):.3f}"
        except Exception as e:
            row.auc = "failed"
            row.status = "AUC " + _err(e)
    return row


def table(rows: list[Row]) -> str:
    head = "| method | LDS (margin) mean ± std over queries | flip AUC | time (s) | peak mem (MB) | status |"
    lines = [head, "|---|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.lds} | {r.auc} | {r.seconds} | {r.peak_mb} | {r.status} |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs (torch threads: {torch.get_num_threads()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(description="LDS / flipped-label AUC of every registered method.")
    cli.add_quick(p, help="smoke run: tiny setup")
    cli.add_out(p, help="markdown file for the table (default: print only)")
    p.add_argument("--only", default=None, help="comma-separated method names (or 'ours', or 'inrun')")
    p.add_argument("--cache-dir", default=str(lds_harness.DEFAULT_CACHE))
    cli.add_seed(p)
    p.add_argument("--no-auc", action="store_true", help="skip the noisy setup")
    cli.add_threads(p)
    args = p.parse_args(argv)
    cli.set_threads(args.threads)
    ours.QUICK = args.quick  # tiny BIF sampling in the smoke run
    ours.NOTES.clear()

    t0 = time.perf_counter()
    setup = lds_harness.build_setup(args.cache_dir, seed=args.seed, quick=args.quick)
    noisy = None if args.no_auc else lds_harness.build_noisy_setup(0.2, args.cache_dir, seed=args.seed, quick=args.quick)
    t_setup = time.perf_counter() - t0
    names = list(METHODS)
    if args.only == "ours":
        names = [n for n in names if n in OURS]
    elif args.only == "inrun":
        names = [n for n in names if n in INRUN]
    elif args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            p.error(f"unknown methods {unknown}; registered: {list(METHODS)}")

    rows = []
    for name in names:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows.append(run_method(name, METHODS[name], setup, noisy))
    out = table(rows)
    notes = [f"- {k}: {v}" for k, v in ours.NOTES.items()]
    if notes:
        out += "\n\n" + "\n".join(notes)
    cmd = cli.command_line("quality", argv)
    header = (f"LDS setup: {setup.n_train} train / {setup.n_queries} queries, {len(setup.subsets)} models on "
              f"alpha=0.5 subsets, recipe {setup.recipe}; setup built/loaded in {t_setup:.1f} s "
              f"(cache {setup.path}); flip AUC on a 20%-flipped copy.")
    print(header)
    print(out)
    if args.out:
        text = (f"# Attribution quality (LDS harness)\n\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
                f"- machine: {machine()}\n- command: `{cmd}`\n- {header}\n\n{out}\n")
        pathlib.Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
