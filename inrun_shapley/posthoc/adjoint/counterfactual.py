"""Exact counterfactual replays of a recorded run, and the adjoint's error per query.

The adjoint pass is the derivative of the final outputs with respect to a weight ``w_i`` on
each sample's loss term, at ``w = 1``; its first-order prediction for removing a set S is
``Δf_q ≈ -Σ_{i ∈ S} value[i, q]``. Where the linearization is the limit (large removals, a
chaotic run), the recording answers the question exactly instead: :func:`replay_outputs`
re-runs every recorded step from the first one, with the recorded batches, hyperparameters and
the optimizer's own update (:mod:`inrun_shapley.optim`), each row's loss term multiplied by its
weight and the batch reduction's denominator unchanged (a removed row is weighted 0; the runs
then differ only by the removed rows, the protocol under which MAGIC measures LDS). One replay
costs about one training run's forward and backward passes.

:func:`removal_check` turns a few such replays into a stated error estimate per query: at
``probes`` random removal sets of a given fraction, the measured change ``Δf_q`` (replay without
S minus replay with every row, both through the same code so their rounding cancels) against the
predicted one; ``error[q]`` is the root mean square of the difference over the probes, ``scale[q]``
that of the measured change, and ``relative = error/scale`` (0 = the linear prediction is exact;
1 = no better than predicting no change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.optim import adam, sgd
from inrun_shapley.posthoc.adjoint.replay import Source, optimizer_step
from inrun_shapley.posthoc.adjoint.stepper import GRAD_TOL, Stepper
from inrun_shapley.posthoc.adjoint.work import Work, cast, check_model
from inrun_shapley.trajectory import Recording


@dataclass
class RemovalCheck:
    """What :func:`removal_check` measured (``R`` probes, ``Q`` queries; units of ``f_q``).

    Attributes:
        removed: the R removal sets (sample ids).
        actual: ``[R, Q]`` measured change of each output when the set is removed (exact replay).
        predicted: ``[R, Q]`` the scores' first-order prediction ``-Σ_{i ∈ S} scores[i, q]``.
        error: ``[Q]`` root mean square over the probes of ``actual - predicted``.
        scale: ``[Q]`` root mean square of ``actual``.
        replay_error: largest relative difference between the replayed final weights (every row
            weighted 1) and the recorded ones (rounding only, e.g. 1e-7 in float32).
    """

    removed: list[np.ndarray]
    actual: np.ndarray
    predicted: np.ndarray
    error: np.ndarray
    scale: np.ndarray
    replay_error: float

    @property
    def relative(self) -> np.ndarray:
        """``[Q]`` error / scale (0 = exact, 1 = no better than predicting no change)."""
        return self.error / np.maximum(self.scale, 1e-300)


def _initial(rec: Recording, source: Source, stepper: Stepper, dtype) -> tuple[Tensor, list[dict]]:
    """θ and the per-tensor optimizer state before the recording's first step."""
    first = rec.first_step
    if first in rec.checkpoint_steps:
        ck = rec.checkpoint(first)
        theta = ck["theta"].to(dtype)
        return theta, source._initial_states(first, ck, theta)
    st = rec.state(first)
    if st.theta is None:
        raise ConfigurationError(f"{rec.path}: θ before step {first} was not recorded; cannot replay the run")
    theta = st.theta.to(dtype)
    states = []
    for j, th in enumerate(theta.split(rec.numels)):
        group = stepper.group(st, j)
        if rec.optimizer == "adam":
            if st.exp_avg is None or st.exp_avg_sq is None or st.grad is None:
                raise ConfigurationError(f"{rec.path}: Adam's state was not recorded; record with "
                                         "TrajectoryRecorder(..., optimizer_state=True)")
            parts = {k: getattr(st, k) for k in ("grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
            after = {adam.STEP: float(st.opt_step[j])}
            for key, name in ((adam.EXP_AVG, "exp_avg"), (adam.EXP_AVG_SQ, "exp_avg_sq"),
                              (adam.MAX_EXP_AVG_SQ, "max_exp_avg_sq")):
                if parts[name] is not None:
                    after[key] = parts[name].split(rec.numels)[j].to(dtype)
            states.append(adam.state_before_step(after, parts["grad"].split(rec.numels)[j].to(dtype), th, group))
        elif sgd.hyper(group).momentum != 0 and bool(st.had_buffer[j]):
            raise ConfigurationError(
                f"{rec.path}: the recording starts after SGD's momentum buffer was created and does not hold "
                "it; record with every > 1 (checkpoints carry the buffer) to replay this run")
        else:
            states.append({sgd.MOMENTUM_BUFFER: None})
    return theta, states


def replay_outputs(
    model: nn.Module,
    recording: Recording | str,
    train_data,
    loss_fn: Callable,
    queries,
    output_fn: Callable | None,
    weights,
    *,
    reduction: str = "mean",
    dtype: torch.dtype | None = torch.float64,
) -> tuple[np.ndarray, float]:
    """Outputs ``f_q`` at the end of the recorded run replayed with per-sample loss weights.

    Args:
        model, train_data, loss_fn, queries, output_fn, reduction: as in
            :func:`~inrun_shapley.posthoc.adjoint.adjoint_influence` (``model`` gives the
            architecture; never modified; ``output_fn`` None = minus the query loss).
        recording: the :class:`~inrun_shapley.trajectory.Recording` (``every=1`` or with a
            checkpoint before its first step) or its directory.
        weights: ``[R, n]`` per-sample weights, one replay per row (1 = as recorded, 0 = removed);
            row ``i`` of a batch contributes ``weights[r, i]·ℓ_i`` with the reduction's denominator
            unchanged.
        dtype: compute dtype (default float64, so that rounding does not blur small changes;
            None = the recording's).

    Returns:
        ``(outputs [R, Q] float64, replay_error)``: ``replay_error`` is the largest relative
        difference between the recorded final weights and a replay with every weight 1, which
        is run first (and is checked step by step against the recorded gradient norms).

    Raises:
        ConfigurationError: the run cannot be replayed (gradient clipping or loss scaling, a
            momentum buffer that was not recorded, a model that does not match).
    """
    rec = recording if isinstance(recording, Recording) else Recording.load(recording)
    check_model(model, rec)
    if output_fn is None:  # the query's utility, as adjoint_influence's default
        output_fn = lambda m, q: -loss_fn(m, q).reshape(-1)  # noqa: E731
    if reduction not in ("mean", "sum"):
        raise ConfigurationError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = dtype or rec.dtype
    w = np.asarray(weights, dtype=np.float64)
    n_rows = rec.max_id() + 1
    if w.ndim != 2 or w.shape[1] < n_rows:
        raise ConfigurationError(f"weights must be [R, n] with n >= {n_rows} (the largest recorded id + 1), "
                                 f"got shape {w.shape}")
    work = Work(model, rec, dtype, loss_fn, reduction, None)
    stepper = Stepper(rec, work, "loo", dtype)
    source = Source(rec, stepper, train_data, dtype)
    queries = cast(queries, dtype)
    steps = [rec.state(s) for s in range(rec.first_step, rec.last_step + 1)]
    for st in steps:
        st.theta = st.grad = st.exp_avg = st.exp_avg_sq = st.max_exp_avg_sq = None  # ids and hyper only
    rows = [source.rows(st.ids) for st in steps]

    def run(wr: np.ndarray | None) -> Tensor:
        theta, states = _initial(rec, source, stepper, dtype)
        for st, batch in zip(steps, rows):
            wt = None if wr is None else torch.as_tensor(wr[st.ids], dtype=dtype)
            g, _, _ = work.terms(theta, batch, weights=wt)
            if wr is None:
                norm = float(g.double().norm())
                if abs(norm - st.grad_norm) > GRAD_TOL * max(st.grad_norm, 1e-12):
                    raise ConfigurationError(
                        f"replay of step {st.step}: the recorded gradient norm is {st.grad_norm:.6g} but loss_fn on "
                        f"the recorded batch gives {norm:.6g} (gradient clipping, loss scaling, dropout, or another "
                        "loss_fn/reduction than in training?): the run cannot be replayed exactly")
            delta, states = optimizer_step(stepper, st, theta, g, states)
            theta = theta + delta
        return theta

    base = run(None)
    ref = rec.final_theta().to(dtype)
    replay_error = float((base - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    outs = []
    for wr in w:
        work.load(run(wr))
        with torch.no_grad():
            outs.append(output_fn(work.model, queries).double().reshape(-1))
    return torch.stack(outs).numpy(), replay_error


def probe_removals(model: nn.Module, rec: Recording, train_data, loss_fn: Callable, queries, output_fn: Callable, *,
                   fraction: float, probes: int, seed: int, reduction: str, dtype) -> tuple[list, np.ndarray, float]:
    """``(removal sets, measured changes [R, Q], replay_error)`` for ``probes`` random removals of
    ``round(fraction·n)`` recorded rows (``probes + 1`` replays of the run)."""
    if not 0 < fraction < 1 or probes < 1:
        raise ConfigurationError(f"fraction must be in (0, 1) and probes >= 1, got {fraction!r}, {probes!r}")
    seen = np.unique(np.concatenate([rec.ids(t) for t in range(rec.first_step, rec.last_step + 1)]))
    n = rec.max_id() + 1
    k = max(1, int(round(fraction * len(seen))))
    rng = np.random.default_rng(seed)
    removed = [np.sort(rng.choice(seen, size=k, replace=False)) for _ in range(probes)]
    weights = np.ones((probes + 1, n))
    for r, ids in enumerate(removed, 1):
        weights[r, ids] = 0.0
    outs, replay_error = replay_outputs(model, rec, train_data, loss_fn, queries, output_fn, weights,
                                        reduction=reduction, dtype=dtype)
    return removed, outs[1:] - outs[0], replay_error


def compare(scores, removed: list, actual: np.ndarray, replay_error: float) -> RemovalCheck:
    """The :class:`RemovalCheck` of ``scores [n, Q]`` against measured changes of ``removed``."""
    s = np.asarray(scores, dtype=np.float64)
    predicted = np.stack([-s[ids].sum(0) for ids in removed])
    if actual.shape != predicted.shape:
        raise ConfigurationError(f"scores have {s.shape[1]} queries but output_fn gives {actual.shape[1]}")
    error = np.sqrt(((actual - predicted) ** 2).mean(0))
    scale = np.sqrt((actual**2).mean(0))
    return RemovalCheck(removed, actual, predicted, error, scale, replay_error)


def removal_check(
    scores,
    model: nn.Module,
    recording: Recording | str,
    train_data,
    loss_fn: Callable,
    queries,
    output_fn: Callable | None = None,
    *,
    fraction: float,
    probes: int = 4,
    seed: int = 0,
    reduction: str = "mean",
    dtype: torch.dtype | None = torch.float64,
) -> RemovalCheck:
    """The error of ``scores``' first-order prediction, per query, at removals of ``fraction``.

    Draws ``probes`` random sets of ``round(fraction·n)`` rows among the recorded ids (seeded),
    replays the run without each (:func:`replay_outputs`) and with every row, and compares the
    change of each output with ``-Σ_{i ∈ S} scores[i, q]`` (module docstring). Costs
    ``probes + 2`` replays of the run; never looks at anything but the recording.

    Args:
        scores: ``[n, Q]`` scores in the adjoint's convention (positive = including i raises f_q).
        fraction: share of the recorded rows removed per probe, in (0, 1).
        probes: number of removal sets (>= 1).
        seed: seed of the removal sets.
        other arguments: as :func:`replay_outputs`.
    """
    rec = recording if isinstance(recording, Recording) else Recording.load(recording)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < rec.max_id() + 1:
        raise ConfigurationError(f"scores must be [n, Q] with n >= {rec.max_id() + 1}, got shape {s.shape}")
    removed, actual, replay_error = probe_removals(model, rec, train_data, loss_fn, queries, output_fn,
                                                   fraction=fraction, probes=probes, seed=seed,
                                                   reduction=reduction, dtype=dtype)
    return compare(s, removed, actual, replay_error)


__all__ = ["RemovalCheck", "compare", "probe_removals", "removal_check", "replay_outputs"]
