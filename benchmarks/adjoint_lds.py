"""LDS of the adjoint pass (docs/math.md §8) on the digits-MLP harness, next to one-step in-run values
and the peers, with time, memory and recording size.

Run::

    python -m benchmarks.adjoint_lds                 # harness default: 1000 train, 100 queries,
                                                     # M=50 retrained models, AdamW, 300 steps
    python -m benchmarks.adjoint_lds --quick         # smoke run (tiny setup, seconds)
    python -m benchmarks.adjoint_lds --no-peers      # skip kronfluence / TracIn
    python -m benchmarks.adjoint_lds --removals 0.01,0.05,0.1,0.5   # + LDS at small removals (default)

One full-data training run (the harness's ``train_full``, bitwise the cached run) carries a
:class:`~inrun_shapley.ShapleyTracker` with ``per_query=True`` (validation rows = the queries,
``val_loss_fn = -margin``, so a positive value raises the margin; ``query_path="exact"`` where
the tracker has that option) and two
:class:`~inrun_shapley.trajectory.TrajectoryRecorder` listeners (``every=1`` and ``every=10``).
Then the adjoint pass scores ``[n_train, Q]`` with ``f_q`` = query margin, in several variants:
the default before issue 27 (``jacobian="loo"``, ``damping="auto"``: the stability rule, chosen
without looking at LDS), no damping, the other Jacobians, the replayed ``every=10`` recording,
the last 100 steps only, and today's default (``jacobian="auto"`` = ``"full"``, ``damping="auto"``). Every row's time is wall-clock of its own computation on top of the training run
(the training row: the whole run with the tracker and the recorders), memory the peak RSS
increase (``quality.PeakRSS``).

**Small removals** (issue 27, :mod:`benchmarks.small_removals`): every score matrix is also judged
on retrainings with 1 %, 5 %, 10 % (and 50 %) of the rows removed under MAGIC's protocol (the full
run's seed, batch order and batch boundaries; a removed row weighted 0 in its batch mean, the
denominator unchanged), next to the harness's own α = 0.5 subsets (reshuffled batch order). Two
rows choose the curvature damping from the recording (``damping="replay"``: exact replays of a
few 5 % removals, the candidate with the smallest measured prediction error; no LDS involved),
and the table under it gives that measured error (median over queries of |actual − predicted| /
|actual|, root mean square over 4 replayed removals) at each fraction, the stated error estimate.
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks import lds_harness, quality, small_removals
from benchmarks.common import cli
from inrun_shapley import ShapleyTracker
from inrun_shapley.metrics import spearman
from inrun_shapley.posthoc.adjoint import adjoint_influence, removal_check
from inrun_shapley.trajectory import Recording, TrajectoryRecorder


def neg_margin(model, batch):
    return -lds_harness.margin_fn(model, batch)


class Recorded(lds_harness.TrainCallback):
    """Tracker (per-query in-run values) + recorders on the harness's full-data run."""

    def __init__(self, setup, root: pathlib.Path, everies=(1, 10)):
        self.setup, self.root, self.everies = setup, root, everies

    def on_train_start(self, model, optimizer):
        # the exact per-query path (one direction per query), where the tracker offers a choice
        exact = {"query_path": "exact"} if "query_path" in inspect.signature(ShapleyTracker).parameters else {}
        self.tracker = ShapleyTracker(model, optimizer, val_data=self.setup.query_set, val_loss_fn=neg_margin,
                                      per_query=True, record_steps=False, **exact)
        self.recorders = [TrajectoryRecorder(self.root / f"every{k}", every=k) for k in self.everies]
        for r in self.recorders:
            self.tracker.add_step_listener(r)
        self.values = None

    def batch(self, step, ids):
        return self.tracker.batch(ids)

    def on_train_end(self, model, optimizer):
        for r in self.recorders:
            r.close()
        self.values = np.asarray(self.tracker.values)
        self.tracker.detach()


def small_table(setup, kept: dict, infos: dict, rec, fractions: list[float], n_models: int) -> None:
    """LDS of every kept score matrix at each removed fraction (MAGIC's protocol), then the
    replay-measured prediction error of the adjoint rows (the stated error estimate)."""
    t0 = time.perf_counter()
    judged = {f: small_removals.removal_setup(setup, f, n_models, verbose=True) for f in fractions}
    print(f"retrainings under MAGIC's protocol: {time.perf_counter() - t0:.1f} s (cached afterwards); weighted loop "
          f"at w = 1 vs the cached full run: max |margin diff| {small_removals.protocol_check(setup):.1e}")
    head = " | ".join(f"{100 * f:g}% removed" for f in fractions)
    lines = [f"| method | harness α = 0.5 (reshuffled) | {head} |", "|---|---|" + "---|" * len(fractions)]
    for name, scores in kept.items():
        cells = " | ".join(f"{judged[f].evaluate(scores).mean:.3f}" for f in fractions)
        lines.append(f"| {name} | {setup.evaluate(scores).mean:.3f} | {cells} |")
    print("\n".join(lines))
    for name, info in infos.items():
        if "damping_errors" in info:
            errs = ", ".join(f"ρ {r:g}: {e:.3f}" for r, e in info["damping_errors"].items())
            print(f"  {name}: replay-measured median relative error at 5 % probes {errs} -> ρ = {info['rho']:g}")
    args = (setup.model(), rec, setup.train_set, lds_harness.loss_fn, setup.query_set, lds_harness.margin_fn)
    small = [f for f in fractions if f < 0.5]
    lines = [f"| scores | {' | '.join(f'{100 * f:g}%: median rel. error' for f in small)} | "
             "Spearman(per-query error, per-query LDS) at the same fraction |", "|---|" + "---|" * (len(small) + 1)]
    for name in [n for n in kept if n.startswith("adjoint default") or n.startswith("adjoint full J, damping=replay")]:
        cells, corr = [], []
        for f in small:
            check = removal_check(kept[name], *args, fraction=f, probes=4, seed=1)
            cells.append(f"{np.median(check.relative):.3f}")
            per_q = judged[f].evaluate(kept[name]).per_query
            corr.append(f"{spearman(check.relative, per_q):.2f}")
        lines.append(f"| {name} | {' | '.join(cells)} | {', '.join(corr)} |")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_quick(p)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--removals", default="0.01,0.05,0.1,0.5",
                   help="removed fractions judged under MAGIC's protocol ('' = none)")
    p.add_argument("--removal-models", type=int, default=50, help="retrainings per removed fraction")
    p.add_argument("--cache-dir", default=str(lds_harness.DEFAULT_CACHE))
    p.add_argument("--gap", action="store_true",
                   help="only the exact derivative (full J, rho=1) and where its small-removal gap comes from")
    cli.add_seed(p)
    cli.add_threads(p)
    args = p.parse_args(argv)
    cli.set_threads(args.threads)
    setup = lds_harness.build_setup(args.cache_dir, seed=args.seed, quick=args.quick)
    root = pathlib.Path(tempfile.mkdtemp(prefix="adjoint_lds_"))
    rows: list[quality.Row] = []
    notes: dict[str, str] = {}

    # -- training: plain, then with tracker + recorders (both timed)
    t0 = time.perf_counter()
    setup.train_full()
    t_plain = time.perf_counter() - t0
    cb = Recorded(setup, root)
    with quality.PeakRSS() as mem:
        t0 = time.perf_counter()
        setup.train_full(cb)
        t_rec = time.perf_counter() - t0
    recs = {k: Recording.load(root / f"every{k}") for k in cb.everies}
    for k, r in recs.items():
        notes[f"every{k}"] = f"{r.bytes_per_step / 1024:.1f} KiB/step ({r.n_params} params)"
    inrun = cb.values[: setup.n_train]
    print(f"training: plain {t_plain:.1f} s; with per-query tracker + 2 recorders {t_rec:.1f} s "
          f"(peak +{mem.mb:.0f} MB); recording every=1: {notes['every1']}, every=10: {notes['every10']}",
          flush=True)

    # -- methods: fn(setup) -> [n_train, Q]
    infos: dict[str, dict] = {}

    def adjoint(name, rec, **kw):
        def fn(s):
            info = infos.setdefault(name, {})
            return adjoint_influence(s.model(), rec, s.train_set, lds_harness.loss_fn, s.query_set,
                                     lds_harness.margin_fn, n_train=s.n_train, progress=False, info=info, **kw)
        return fn

    methods = {
        "in-run per-query (one-step, fixed-state Shapley)": lambda s: inrun,
        "adjoint loo J, damping=auto (the default before issue 27)": adjoint("auto", recs[1], jacobian="loo"),
        "adjoint loo J, no damping (rho=1)": adjoint("rho1", recs[1], damping=1.0),
        "adjoint fixed-state P, rho=1": adjoint("fixed", recs[1], jacobian="fixed_state", damping=1.0),
        "adjoint full (real-run derivative), rho=1": adjoint("full", recs[1], jacobian="full", damping=1.0),
        "adjoint loo J, auto, replayed every=10": adjoint("every10", recs[10], jacobian="loo"),
        "adjoint loo J, auto, last 100 steps": adjoint("last100", recs[1], jacobian="loo", last_steps=100),
        "adjoint default (jacobian auto = full, damping auto)": adjoint("default", recs[1]),
        "adjoint full J, damping=replay (5% probes)": adjoint("full_replay", recs[1], jacobian="full",
                                                              damping="replay"),
        "adjoint loo J, damping=replay (5% probes)": adjoint("loo_replay", recs[1], jacobian="loo",
                                                             damping="replay"),
    }
    if args.gap:
        scores = adjoint("full", recs[1], jacobian="full", damping=1.0)(setup)
        for line in small_removals.gap_report(setup, recs[1], scores, n_models=args.removal_models,
                                              replays=3 if args.quick else 10):
            print(line, flush=True)
        shutil.rmtree(root, ignore_errors=True)
        return
    if args.quick:  # a smoke run: the default, the exact derivative and the replay-chosen damping
        methods = {k: v for k, v in methods.items() if "default" in k or "full" in k or k.startswith("in-run")}
    if not args.no_peers:
        from benchmarks import peers

        methods["grad dot (last ckpt)"] = peers.grad_dot
        methods["TracIn (20 ckpts)"] = peers.tracin_checkpoints
        methods["kronfluence EK-FAC"] = peers.kronfluence_ekfac
    kept: dict[str, np.ndarray] = {}
    for name, fn in methods.items():
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        row = quality.run_method(name, lambda s, fn=fn, name=name: kept.setdefault(name, fn(s)), setup, None)
        rows.append(row)
    # -- table
    print(f"LDS setup: {setup.n_train} train / {setup.n_queries} queries, {len(setup.subsets)} models on alpha=0.5 "
          f"subsets, {setup.recipe.steps(setup.n_train)} AdamW steps, recipe {setup.recipe}")
    print(quality.table(rows))
    for name, info in infos.items():
        radii = info.get("radii") or []
        print(f"  {name}: rho={info.get('rho'):.4g}, power-iteration radii of eta*J*H at 8 steps: "
              f"{', '.join(f'{r:.3g}' for r in radii) if radii else '-'}; steps {info.get('steps')}; "
              f"replay error {info.get('replay_error', 0):.2e}")
    fractions = [float(f) for f in args.removals.split(",") if f.strip()]
    if fractions:
        small_table(setup, kept, infos, recs[1], fractions, args.removal_models)
    print(f"machine: {quality.machine()}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
