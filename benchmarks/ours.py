"""Our attribution methods on an :class:`~lds_harness.LDSSetup`: ``fn(setup) -> [n_train, Q]``.

Registered in ``quality.py`` next to the peers of ``peers.py``, with the same sign convention:
``scores[i, q] > 0`` means *including training sample i raises query q's margin*. How each one
gets there:

* **in-run values** (:func:`inrun_shapley_per_query`, :func:`inrun_sgd_per_query`): ONE re-run of
  the harness's full-data training (``setup.train_full``, bitwise the cached run) carries two
  :class:`~inrun_shapley.ShapleyTracker` s side by side, ``per_query=True``,
  ``query_path="exact"``, validation rows = the queries, ``val_loss_fn = −margin``, estimators
  ``"shapley"`` (fixed-state Shapley for AdamW, one-step) and ``"sgd"`` (lr × gradient dot
  product). A tracker's value is the *decrease* of the validation loss that sample i causes,
  summed over the steps it took part in; the loss is −margin, so the value is the *increase of
  the margin*: taken as is. (Checked on the quick setup: both correlate positively with
  ``peers.grad_dot`` and have positive LDS.) The same run also carries a
  :class:`~inrun_shapley.trajectory.TrajectoryRecorder` (``every=1``, listening to the
  ``shapley`` tracker) for the adjoint pass. The run is done once per setup and cached in this
  process (:func:`shared_run`), so whichever of the three methods runs first pays for it and the
  others reuse it (``quality.py`` prints that note under the table).
* **adjoint** (:func:`adjoint_loo`): :func:`inrun_shapley.posthoc.adjoint.adjoint_influence` on that
  recording with ``f_q`` = the query margin and default options (``jacobian="loo"``,
  ``damping="auto"``). It returns ``scores[i, q] > 0`` = including i raises ``f_q``: taken as is.
* **BIF** (:func:`bif_large_gamma`): :func:`inrun_shapley.posthoc.bif.bayesian_influence` around the
  full-data model with the observable = the query margin, the best-conditioned setting of
  ``benchmarks/RESULTS.md`` §6 (ε = 2e-4, nβ = 50, γ = 1e3, 4 chains × 500 draws, thin 2, burn-in
  = draws, seed 0; SGLD minibatches of 64 as in ``bif_digits.py``), not tuned on LDS.
  ``.influence`` = β·BIF, positive = including i raises the observable (the margin): taken as
  is. In ``--quick`` mode (:data:`QUICK`) 2 chains × 20 draws, burn-in 20 (a smoke run only).
* **grad dot, learned group weights** (:func:`grad_dot_learned_weights`): per-tensor group
  components ``C_j(i, q) = ⟨∇_j ℓ_i, ∇_j(−m_q)⟩`` at the last checkpoint (the full-data model)
  from :func:`inrun_shapley.posthoc.weighting.compute_group_components` (query loss = −margin, so
  ``Σ_j C_j`` is exactly ``peers.grad_dot``, positive = raises the margin), weights from
  :func:`~inrun_shapley.posthoc.weighting.fit_weights` (default ``FitConfig``, label-free objective,
  never sees the retrained models), scores ``reweigh(C_lds, w)``. The harness defines no fitting
  queries, so the weights are fitted on :data:`N_FIT` *separate* held-out digits taken from the
  harness's own split: ``lds_harness.load_data(seed, n_train, Q + N_FIT)`` gives the same
  training rows, the same standardization and the same first Q queries (checked), then N_FIT
  further rows that are neither trained on nor LDS queries. If that check fails (a custom setup)
  the weights are fitted on the LDS queries themselves, and the note says so.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import lds_harness
from benchmarks.lds_harness import LDSSetup, margins

QUICK = False  # set by quality.py --quick: tiny BIF sampling
N_FIT = 100  # separate fitting queries for the learned group weights
NOTES: dict[str, str] = {}  # method name -> one line printed under the quality table

NAMES = {
    "midpoint": "in-run midpoint = default (per-query, one-step)",
    "shapley": "in-run shapley (per-query, one-step)",
    "shapley2": "in-run shapley, second order (per-query)",
    "sgd": "in-run sgd-form (per-query)",
    "adjoint": "adjoint (loo J, default damping)",
    "bif": "BIF (large γ)",
    "weights": "grad dot, learned group weights",
}


def neg_margin(model, batch):
    """Validation loss of the trackers: ``−margin`` per query (value = increase of the margin)."""
    return -lds_harness.margin_fn(model, batch)


# --------------------------------------------------------------------------- the shared run
class _SharedRun(lds_harness.TrainCallback):
    """Three per-query trackers (``shapley`` first and second order, ``sgd``) + one trajectory
    recorder on one run."""

    def __init__(self, setup: LDSSetup, root: Path):
        self.setup, self.root = setup, root

    def on_train_start(self, model, optimizer):
        from inrun_shapley import ShapleyTracker
        from inrun_shapley.trajectory import TrajectoryRecorder

        variants = {"midpoint": ("midpoint", 1), "shapley": ("shapley", 1), "shapley2": ("shapley", 2),
                    "sgd": ("sgd", 1)}
        self.trackers = {
            key: ShapleyTracker(model, optimizer, val_data=self.setup.query_set, val_loss_fn=neg_margin,
                                estimator=est, order=order, per_query=True, query_path="exact", record_steps=False)
            for key, (est, order) in variants.items()
        }
        self.recorder = TrajectoryRecorder(self.root / "every1", every=1)
        self.trackers["shapley"].add_step_listener(self.recorder)

    def batch(self, step, ids):
        stack = ExitStack()
        for tr in self.trackers.values():
            stack.enter_context(tr.batch(ids))
        return stack

    def on_train_end(self, model, optimizer):
        self.recorder.close()
        n = self.setup.n_train
        self.values = {est: np.asarray(tr.values, dtype=np.float64)[:n].copy() for est, tr in self.trackers.items()}
        for tr in self.trackers.values():
            tr.detach()
        self.final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


_RUNS: dict[int, tuple[LDSSetup, dict]] = {}  # id(setup) -> (setup kept alive, results)


def _cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def shared_run(setup: LDSSetup) -> dict:
    """The one training run with both trackers and the recorder, done once per setup.

    Returns ``{"shapley": [n, Q], "sgd": [n, Q], "recording": path, "model": trained model,
    "seconds": wall time of the run}``.
    """
    hit = _RUNS.get(id(setup))
    if hit is not None and hit[0] is setup:
        return hit[1]
    root = Path(tempfile.mkdtemp(prefix="quality_inrun_"))
    atexit.register(_cleanup, str(root))
    cb = _SharedRun(setup, root)
    t0 = time.perf_counter()
    setup.train_full(cb)
    seconds = time.perf_counter() - t0
    model = setup.recipe.make_model()
    model.load_state_dict(cb.final_state)
    res = {**cb.values, "recording": root / "every1", "model": model.eval(), "seconds": seconds}
    _RUNS[id(setup)] = (setup, res)
    note = (f"one training run with both per-query trackers + a recorder ({seconds:.1f} s) is shared by "
            f"'{NAMES['midpoint']}', '{NAMES['shapley']}', '{NAMES['shapley2']}', '{NAMES['sgd']}' and '{NAMES['adjoint']}'; "
            "its time and memory are "
            "counted in the first of them that runs, the others reuse it")
    NOTES.setdefault("shared run", note)
    return res


def inrun_midpoint_per_query(setup: LDSSetup) -> np.ndarray:
    """Per-query In-Run Shapley values with the default midpoint estimator, ``[n, Q]``."""
    return shared_run(setup)["midpoint"]


def inrun_shapley_per_query(setup: LDSSetup) -> np.ndarray:
    """Per-query fixed-state In-Run Shapley values (AdamW-aware, one-step), ``[n, Q]``."""
    return shared_run(setup)["shapley"]


def inrun_shapley2_per_query(setup: LDSSetup) -> np.ndarray:
    """Per-query second-order In-Run Shapley values (one validation HVP per query and step)."""
    return shared_run(setup)["shapley2"]


def inrun_sgd_per_query(setup: LDSSetup) -> np.ndarray:
    """Per-query SGD-form in-run values (lr × gradient dot product per step), ``[n, Q]``."""
    return shared_run(setup)["sgd"]


def adjoint_loo(setup: LDSSetup) -> np.ndarray:
    """Adjoint pass over the shared run's recording, ``f_q`` = margin, default options."""
    from inrun_shapley.posthoc.adjoint import adjoint_influence

    run = shared_run(setup)
    info: dict = {}
    scores = adjoint_influence(run["model"], run["recording"], setup.train_set, lds_harness.loss_fn,
                               setup.query_set, lds_harness.margin_fn, n_train=setup.n_train,
                               jacobian="loo", progress=False, info=info)
    if setup.subsets.shape[0] >= 2:  # the clean setup
        NOTES[NAMES["adjoint"]] = (f"rho={info.get('rho', float('nan')):.4g} (damping='auto'), "
                                   f"steps {info.get('steps')}, replay error {info.get('replay_error', 0):.1e}")
    return scores


# --------------------------------------------------------------------------- BIF
def bif_config(seed: int = 0):
    from inrun_shapley.posthoc.bif import BIFConfig

    if QUICK:
        return BIFConfig(step_size=2e-4, n_beta=50.0, gamma=1e3, chains=2, draws=20, burn_in=20, thin=1, seed=seed,
                         control_variate=None)
    return BIFConfig(step_size=2e-4, n_beta=50.0, gamma=1e3, chains=4, draws=500, thin=2, burn_in=None, seed=seed,
                     control_variate=None)  # the recorded setting (no auto field)


def bif_large_gamma(setup: LDSSetup) -> np.ndarray:
    """``BIFResult.influence`` (β·BIF) with observable = query margin, RESULTS.md §6 setting."""
    from inrun_shapley.posthoc.bif import bayesian_influence

    cfg = bif_config()
    loader = DataLoader(TensorDataset(*setup.train_set), batch_size=64, shuffle=True)
    res = bayesian_influence(setup.model(), lds_harness.loss_fn, loader, setup.train_set, setup.query_set,
                             config=cfg, observable_fn=lds_harness.margin_fn, progress=False)
    if setup.subsets.shape[0] >= 2:
        d = res.diagnostics
        NOTES[NAMES["bif"]] = (f"eps={cfg.step_size:g}, n_beta={res.n_beta:g}, gamma={cfg.gamma:g}, "
                               f"{cfg.chains}x{cfg.draws} draws, thin {cfg.thin}: R-hat {d.rhat:.3f}, "
                               f"ESS {d.ess:.0f} of {res.n_draws}, drift {100 * d.drift_fraction:.2f}%")
    return res.influence.double().numpy()


# --------------------------------------------------------------------------- learned group weights
def fitting_queries(setup: LDSSetup, n_fit: int = N_FIT):
    """``(x, y)`` of ``n_fit`` held-out digits from the harness's split, or None if not derivable."""
    cfg = setup.config
    try:
        x_tr, _, x_q, y_q = lds_harness.load_data(cfg["seed"], cfg["n_train"], cfg["n_queries"] + n_fit)
    except (KeyError, ValueError):
        return None
    q = setup.n_queries
    if not (torch.equal(x_tr, setup.x_train) and torch.equal(x_q[:q], setup.x_query)
            and torch.equal(y_q[:q], setup.y_query)):
        return None
    return x_q[q:], y_q[q:]


def _neg_margin_loss(outputs, y):
    return -margins(outputs, y).sum()


def grad_dot_learned_weights(setup: LDSSetup) -> np.ndarray:
    """Per-tensor components of the last-checkpoint gradient dot product, reweighed by fitted weights."""
    from inrun_shapley.posthoc.weighting import FitConfig, compute_group_components, fit_weights, reweigh

    model = setup.model()
    common = dict(query_loss_fn=_neg_margin_loss, batch_size=250)
    comps = compute_group_components(model, F.cross_entropy, setup.train_set, setup.query_set, "tensor", **common)
    fit = fitting_queries(setup)
    if fit is not None:
        comps_fit = compute_group_components(model, F.cross_entropy, setup.train_set, fit, "tensor", **common)
        where = f"{len(fit[0])} separate held-out fitting queries"
    else:
        comps_fit, where = comps, "the LDS queries themselves (no separate fitting queries derivable)"
    w = fit_weights(comps_fit, FitConfig(seed=0), aspect="margin")
    if setup.subsets.shape[0] >= 2:
        NOTES[NAMES["weights"]] = ("weights fitted on " + where + ": "
                                   + ", ".join(f"{g}={v:.3g}" for g, v in w.as_dict().items()))
    return reweigh(comps, w)


METHODS = {
    NAMES["midpoint"]: inrun_midpoint_per_query,
    NAMES["shapley"]: inrun_shapley_per_query,
    NAMES["shapley2"]: inrun_shapley2_per_query,
    NAMES["sgd"]: inrun_sgd_per_query,
    NAMES["adjoint"]: adjoint_loo,
    NAMES["bif"]: bif_large_gamma,
    NAMES["weights"]: grad_dot_learned_weights,
}

__all__ = ["METHODS", "NAMES", "NOTES", "QUICK", "shared_run", "inrun_midpoint_per_query", "inrun_shapley_per_query", "inrun_shapley2_per_query", "inrun_sgd_per_query",
           "adjoint_loo", "bif_large_gamma", "grad_dot_learned_weights", "fitting_queries"]
