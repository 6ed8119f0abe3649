"""What :class:`~inrun_shapley.posthoc.bif.BIFConfig`'s ``"auto"`` fields resolve to.

Every rule reads the model's own measurements at w* and one short pilot run of the sampler; none
looks at attribution quality. In order (``bayesian_influence`` runs them when a field is
``"auto"``, the default):

1. **Measurements at w*.** ``d`` sampled parameters, their norm ``‖w*‖``, the largest eigenvalue
   ``h`` of the Hessian of one training minibatch's mean loss (power iteration on
   Hessian-vector products, :func:`~inrun_shapley.posthoc.bif.tuning.largest_precision`), and the
   seconds one evaluation of the traced values takes.
2. **Localization** ``γ`` (1/parameter²): the Gaussian ``γ/2·‖w − w*‖²`` alone would spread the
   weights by ``sqrt(d/γ)``; ``γ = d / (δ·‖w*‖)²`` sets that spread to a fraction ``δ`` =
   :data:`RELATIVE_SPREAD` of the weights' norm (a scale-free statement: the same relative
   neighbourhood for any parametrization size), and ``γ ≥`` :data:`PRIOR_DOMINANCE` ``·nβ·h``
   keeps the localizing term the stiffest one, so that every direction mixes in about the same
   number of steps (condition number ``(nβ·h + γ)/γ`` at most ``1 + 1/PRIOR_DOMINANCE``).
3. **Step size** ``ε = 4·tol/(nβ·h + γ)`` (tol = :data:`BIAS_TOLERANCE`: unadjusted Langevin
   inflates the variance along a direction of precision λ by ``1/(1 − ελ/4)``), and ``ε·γ ≤ 0.4``.
4. **Burn-in** ``ln(100)/(ε·γ)`` steps: every direction contracts at least as ``(1 − εγ/2)`` per
   step, so the slowest one is within 1 % of its stationary variance.
5. **Control variate** ``"diagonal"`` when the per-sample gradients it needs,
   ``(n_train + n_observables)·d`` float64 numbers, fit in :data:`CV_MEMORY_BYTES`; else none.
6. **Pilot**: the chains at thin 1 for :data:`PILOT_DRAWS` draws each (after the burn-in) give the
   integrated autocorrelation time τ (SGLD steps, median over the traced per-sample losses) and
   the seconds per SGLD step; **thinning** maximizes effective draws per unit of work
   (:func:`~inrun_shapley.posthoc.bif.tuning.best_thin`) with the work counted in rows through
   the model, not in measured seconds, so that the same call gives the same result on a loaded
   machine: one SGLD step = ``3·B`` (forward and backward of a minibatch of B rows), one draw =
   ``n_train + n_observables`` rows forward.
7. **Draws** per chain: with ``budget_s``, as many as fit in what is left of the budget after the
   steps above; without, enough for ``target_ess`` effective pooled draws (``C·T/τ_k``, ``τ_k``
   the autocorrelation time at the chosen thinning), between :data:`MIN_DRAWS` and
   :data:`MAX_DRAWS`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Optional

import torch

from inrun_shapley.posthoc.bif.config import BIFConfig
from inrun_shapley.posthoc.bif.diagnostics import effective_sample_size, split_rhat
from inrun_shapley.posthoc.bif.moments import make_store
from inrun_shapley.posthoc.bif.tuning import best_thin, largest_precision

AUTO = "auto"
AUTO_FIELDS = ("step_size", "gamma", "burn_in", "thin", "draws", "control_variate")
RELATIVE_SPREAD = 0.5
PRIOR_DOMINANCE = 10.0
BIAS_TOLERANCE = 0.05
CV_MEMORY_BYTES = 1 << 28
PILOT_DRAWS = 50
MIN_DRAWS, MAX_DRAWS = 20, 20_000


def auto_fields(cfg: BIFConfig) -> list[str]:
    """The fields of ``cfg`` left to :func:`resolve`."""
    return [f for f in AUTO_FIELDS if getattr(cfg, f) == AUTO]


def posterior_settings(cfg: BIFConfig, n_beta: float, curvature: float, d: int, weight_norm: float,
                       n_traced: int) -> dict:
    """Steps 2–5 of the module docstring: ``gamma``, ``step_size``, ``burn_in``, ``control_variate``
    (only the fields ``cfg`` leaves to ``"auto"``; the others as given)."""
    out: dict = {}
    gamma = cfg.gamma
    if gamma == AUTO:
        spread = d / (RELATIVE_SPREAD * max(weight_norm, 1e-12)) ** 2
        gamma = max(spread, PRIOR_DOMINANCE * n_beta * curvature)
        out["gamma"] = gamma
    step = cfg.step_size
    if step == AUTO:
        step = 4 * BIAS_TOLERANCE / (n_beta * curvature + gamma)
        if gamma > 0:
            step = min(step, 0.4 / gamma)
        out["step_size"] = step
    if cfg.burn_in == AUTO:
        out["burn_in"] = int(math.ceil(math.log(100.0) / (step * gamma))) if gamma > 0 else 4 * PILOT_DRAWS
    if cfg.control_variate == AUTO:
        fits = n_traced * d * 8 <= CV_MEMORY_BYTES
        out["control_variate"] = "diagonal" if fits and gamma > 0 else None
    return out


def sampling_settings(cfg: BIFConfig, pilot_traces: torch.Tensor, step_work: float, draw_work: float,
                      step_seconds: float, draw_seconds: float, seconds_left: Optional[float]) -> dict:
    """Steps 6–7: ``thin`` and ``draws`` from the pilot's ``[C, T, n_train]`` loss traces (thinning
    from the work model ``step_work``/``draw_work``, draws for a budget from measured seconds)."""
    ess = effective_sample_size(pilot_traces)
    ess = ess[torch.isfinite(ess)]
    chains, pilot = pilot_traces.shape[0], pilot_traces.shape[1]
    tau = float(chains * pilot / float(ess.median())) if ess.numel() else 1.0
    thin = cfg.thin if cfg.thin != AUTO else best_thin(tau, step_work, draw_work)
    r = (tau - 1.0) / (tau + 1.0)
    tau_k = (1 + r**thin) / max(1 - r**thin, 1e-12)
    out: dict = {"tau_steps": tau, "tau_draws": tau_k}
    if cfg.thin == AUTO:
        out["thin"] = thin
    if cfg.draws == AUTO:
        if seconds_left is not None:
            per_draw = chains * (thin * step_seconds + draw_seconds)
            draws = int(seconds_left / per_draw)
        else:
            draws = int(math.ceil(cfg.target_ess * tau_k / chains))
        out["draws"] = int(min(max(draws, MIN_DRAWS), MAX_DRAWS))
        out["budget_too_small"] = bool(draws < MIN_DRAWS)
    return out


def resolve(cfg: BIFConfig, make_sampler: Callable, n_beta: float, make_control: Callable, start: float) -> tuple[
        BIFConfig, dict, Any]:
    """``cfg`` with every ``"auto"`` field resolved (module docstring), the report of what was
    measured, and the control variate's gradients (or None) for the caller to reuse.

    Args:
        cfg: the settings asked for.
        make_sampler: ``cfg -> sampler`` (a sequential :class:`SGLDSampler` with its anchor
            measured), used for the measurements and the pilot.
        n_beta: nβ (resolved by the caller).
        make_control: ``(sampler, cfg, grads or None) -> (control variate, grads)``.
        start: ``time.perf_counter()`` at the start of the call (for ``budget_s``).
    """
    provisional = dataclasses.replace(cfg, step_size=1e-4, gamma=1.0, burn_in=0, thin=1, draws=PILOT_DRAWS,
                                      control_variate=None, online=False)
    sampler = make_sampler(provisional)
    selected = sampler.snapshot.selected
    d = sum(p.numel() for p in selected)
    weight_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in selected))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        batch = next(iter(sampler.train_loader))
    with torch.no_grad():
        rows = len(sampler.loss_fn(sampler.model, batch))
    with torch.enable_grad():
        curvature = largest_precision(sampler.model, sampler.loss_fn, batch, selected, iterations=20)
    t0 = time.perf_counter()
    for _ in range(2):
        sampler.traced_values()
    draw_seconds = (time.perf_counter() - t0) / 2
    n_x, n_y = sampler.ref_x.shape[0], sampler.ref_y.shape[0]
    chosen = posterior_settings(cfg, n_beta, curvature, d, weight_norm, n_x + n_y)
    fixed = {k: chosen.get(k, getattr(cfg, k)) for k in ("step_size", "gamma", "burn_in", "control_variate")}
    report = {"auto": auto_fields(cfg), "n_beta": n_beta, "curvature": curvature, "d": d, "weight_norm": weight_norm,
              "draw_seconds": draw_seconds}
    grads = None
    if fixed["control_variate"] is not None:
        try:
            _, grads = make_control(sampler, dataclasses.replace(provisional, **fixed), None)
        except Exception as exc:  # noqa: BLE001 - only the auto choice falls back; a requested CV raises
            if cfg.control_variate != AUTO:
                raise
            warnings.warn(f"BIF: the control variate needs per-sample gradients through torch.func.vmap, which "
                          f"failed ({type(exc).__name__}: {exc}); sampling without it. Set "
                          "control_variate=None to silence this.", stacklevel=4)
            chosen["control_variate"] = fixed["control_variate"] = None
    if cfg.thin != AUTO and cfg.draws != AUTO:
        report.update(chosen)
        return dataclasses.replace(cfg, **chosen), report, grads
    pilot_cfg = dataclasses.replace(cfg, **fixed, thin=1, draws=PILOT_DRAWS, online=False)
    pilot = make_sampler(pilot_cfg)
    if grads is not None:
        pilot.control_variate, _ = make_control(pilot, pilot_cfg, grads)
    store = make_store(pilot_cfg.chains, pilot_cfg.draws, n_x, n_y, cfg.trace_dtype, False)
    t0 = time.perf_counter()
    traces = pilot.run(store, False)
    pilot_seconds = time.perf_counter() - t0
    steps = pilot_cfg.chains * pilot_cfg.steps_per_chain
    step_seconds = max(pilot_seconds - pilot_cfg.chains * pilot_cfg.draws * draw_seconds, 1e-6) / steps
    seconds_left = None
    if cfg.budget_s is not None:
        seconds_left = cfg.budget_s - (time.perf_counter() - start) - cfg.chains * pilot_cfg.resolved_burn_in * step_seconds
    sampling = sampling_settings(cfg, store.x, 3.0 * rows, float(n_x + n_y), step_seconds, draw_seconds, seconds_left)
    chosen.update({k: sampling[k] for k in ("thin", "draws") if k in sampling})
    report.update(step_seconds=step_seconds, pilot_seconds=pilot_seconds, pilot_rhat=float(split_rhat(traces.loss)),
                  tau_steps=sampling["tau_steps"], tau_draws=sampling["tau_draws"],
                  budget_too_small=sampling.get("budget_too_small", False), **chosen)
    return dataclasses.replace(cfg, **chosen), report, grads


__all__ = ["AUTO", "AUTO_FIELDS", "auto_fields", "posterior_settings", "resolve", "sampling_settings"]
