"""LDS of the adjoint pass (docs/math.md §8) on the digits-MLP harness, next to one-step in-run values
and the peers, with time, memory and recording size.

Run::

    python -m benchmarks.adjoint_lds                 # harness default: 1000 train, 100 queries,
                                                     # M=50 retrained models, AdamW, 300 steps
    python -m benchmarks.adjoint_lds --quick         # smoke run (tiny setup, seconds)
    python -m benchmarks.adjoint_lds --no-peers      # skip kronfluence / TracIn

One full-data training run (the harness's ``train_full``, bitwise the cached run) carries a
:class:`~inrun_shapley.ShapleyTracker` with ``per_query=True`` (validation rows = the queries,
``val_loss_fn = -margin``, so a positive value raises the margin; ``query_path="exact"`` where
the tracker has that option) and two
:class:`~inrun_shapley.trajectory.TrajectoryRecorder` listeners (``every=1`` and ``every=10``).
Then the adjoint pass scores ``[n_train, Q]`` with ``f_q`` = query margin, in several variants:
the default (``jacobian="loo"``, ``damping="auto"``: the stability rule, chosen without looking
at LDS), no damping, the other Jacobians, the replayed ``every=10`` recording, and the last 100
steps only. Every row's time is wall-clock of its own computation on top of the training run
(the training row: the whole run with the tracker and the recorders), memory the peak RSS
increase (``quality.PeakRSS``).
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

from benchmarks import lds_harness, quality
from benchmarks.common import cli
from inrun_shapley import ShapleyTracker
from inrun_shapley.posthoc.adjoint import adjoint_influence
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_quick(p)
    p.add_argument("--no-peers", action="store_true")
    cli.add_seed(p)
    cli.add_threads(p)
    args = p.parse_args(argv)
    cli.set_threads(args.threads)
    setup = lds_harness.build_setup(lds_harness.DEFAULT_CACHE, seed=args.seed, quick=args.quick)
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
        "adjoint loo J, damping=auto (default)": adjoint("auto", recs[1]),
        "adjoint loo J, no damping (rho=1)": adjoint("rho1", recs[1], damping=1.0),
        "adjoint fixed-state P, rho=1": adjoint("fixed", recs[1], jacobian="fixed_state", damping=1.0),
        "adjoint full (real-run derivative), rho=1": adjoint("full", recs[1], jacobian="full", damping=1.0),
        "adjoint loo J, auto, replayed every=10": adjoint("every10", recs[10]),
        "adjoint loo J, auto, last 100 steps": adjoint("last100", recs[1], last_steps=100),
    }
    if not args.no_peers:
        from benchmarks import peers

        methods["grad dot (last ckpt)"] = peers.grad_dot
        methods["TracIn (20 ckpts)"] = peers.tracin_checkpoints
        methods["kronfluence EK-FAC"] = peers.kronfluence_ekfac
    for name, fn in methods.items():
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        row = quality.run_method(name, fn, setup, None)
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
    print(f"machine: {quality.machine()}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
