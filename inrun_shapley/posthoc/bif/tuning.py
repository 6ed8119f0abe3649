"""Sampler settings chosen from measurements of the sampler, never from attribution quality.

:func:`choose_config` keeps the posterior the user asked for (nβ, γ, the chains) and picks how to
sample it:

* **step size** ε from the curvature: the largest posterior precision λ_max = nβ·λ_max(H_batch) + γ
  (power iteration on Hessian-vector products of one training minibatch at w*), and the rule
  that unadjusted Langevin inflates the variance along a direction of precision λ by
  ``1/(1 − ελ/4)`` (docs/math.md §9): ε = 4·tol/λ_max keeps that bias below ``bias_tolerance``
  everywhere, and ε·γ ≤ 0.4 whatever H;
* **burn-in** from the localizing term: every direction contracts at least as fast as
  ``(1 − εγ/2)`` per step, so ``ln(100)/(εγ)`` steps bring the variance of the slowest direction
  within 1 % of its stationary value; doubled while the pilot's split-R̂ exceeds 1.05;
* **thinning** from the measured autocorrelation: a thin=1 pilot gives the integrated
  autocorrelation time τ (in SGLD steps, median over the traced per-sample losses); modelled as
  AR(1) with lag-one correlation r = (τ−1)/(τ+1), keeping every k-th step gives
  ``τ_k = (1 + r^k)/(1 − r^k)`` draws per independent one at a cost of ``k·s + e`` seconds per draw
  (s = one SGLD step, e = one evaluation of the traced values, both measured), and k maximizes
  effective draws per second ``1/(τ_k·(k·s + e))``;
* **draws** from a time budget when one is given.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif.config import BIFConfig, LossFn, ParamSelection
from inrun_shapley.posthoc.bif.evaluation import evaluate
from inrun_shapley.posthoc.bif.sampler import ModelSnapshot, select_params


def best_thin(tau_steps: float, step_seconds: float, draw_seconds: float, max_thin: int = 50) -> int:
    """The thinning k that maximizes effective draws per second (AR(1) model, see module doc).

    Args:
        tau_steps: integrated autocorrelation time of the traces at thin=1, in SGLD steps (≥ 1).
        step_seconds: seconds per SGLD step.
        draw_seconds: seconds per recorded draw (evaluating the traced values).
        max_thin: largest k considered.
    """
    tau = max(float(tau_steps), 1.0)
    r = (tau - 1.0) / (tau + 1.0)
    ks = np.arange(1, max_thin + 1)
    rk = r ** ks
    tau_k = (1 + rk) / (1 - rk + 1e-300)
    rate = 1.0 / (tau_k * (ks * step_seconds + draw_seconds))
    return int(ks[int(np.argmax(rate))])


def largest_precision(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: list[nn.Parameter], iterations: int = 30
) -> float:
    """Largest eigenvalue of the Hessian of the mean loss on ``batch`` (power iteration on
    Hessian-vector products; the model must have ``requires_grad`` on ``params``)."""
    loss = loss_fn(model, batch).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    value = 0.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        value = sum(float((a * b).sum()) for a, b in zip(hv, v))
        v = [h.detach() for h in hv]
    return abs(value)


def choose_config(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Any,
    train_samples: Any,
    queries: Any,
    base: Optional[BIFConfig] = None,
    observable_fn: Optional[LossFn] = None,
    params: ParamSelection = None,
    bias_tolerance: float = 0.05,
    pilot_draws: int = 200,
    budget_seconds: Optional[float] = None,
) -> tuple[BIFConfig, dict]:
    """A :class:`BIFConfig` with step size, burn-in, thinning (and draws) chosen from diagnostics.

    ``base`` fixes the posterior (nβ, γ, the sampled parameters) and everything not listed in the
    module docstring; its ``step_size``, ``burn_in``, ``thin`` (and ``draws`` when
    ``budget_seconds`` is given) are replaced. Runs one short pilot of ``bayesian_influence``
    (thin 1, ``pilot_draws`` draws per chain) and never looks at any attribution score.

    Args:
        model, loss_fn, train_loader, train_samples, queries, observable_fn, params: as in
            :func:`~inrun_shapley.posthoc.bif.bayesian_influence`.
        base: starting settings (default ``BIFConfig()``); ``n_beta`` must be set.
        bias_tolerance: largest relative variance inflation ε·λ/4 allowed along any direction.
        pilot_draws: draws per chain of the pilot (≥ 20).
        budget_seconds: if given, draws per chain so that sampling takes about this long.

    Returns:
        ``(config, report)``: the chosen settings and the measurements behind them
        (``lambda_max``, ``tau_steps``, ``step_seconds``, ``draw_seconds``, pilot ``rhat``,
        ``ess``, ``drift``).
    """
    from inrun_shapley.posthoc.bif.api import bayesian_influence

    cfg = base if base is not None else BIFConfig()
    if cfg.n_beta is None or cfg.gamma == "auto":
        raise ConfigurationError("choose_config needs base.n_beta and base.gamma set (they are the posterior asked "
                                 "for); bayesian_influence with the 'auto' defaults chooses them itself.")
    if not 0 < bias_tolerance < 1 or pilot_draws < 20:
        raise ConfigurationError("choose_config: bias_tolerance must be in (0, 1) and pilot_draws >= 20.")
    selected = select_params(model, params if params is not None else cfg.params)
    snapshot = ModelSnapshot(model, selected)
    try:
        snapshot.enter_sampling_mode()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            batch = next(iter(train_loader))
        with torch.enable_grad():
            curvature = largest_precision(model, loss_fn, batch, snapshot.selected)
        eval_start = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):
                evaluate(model, loss_fn, train_samples, cfg.eval_batch_size, "train_samples", True)
                evaluate(model, observable_fn or loss_fn, queries, cfg.eval_batch_size, "queries", False)
        draw_seconds = (time.perf_counter() - eval_start) / 3
    finally:
        snapshot.restore()
    lambda_max = cfg.n_beta * curvature + cfg.gamma
    step_size = 4 * bias_tolerance / lambda_max
    if cfg.gamma > 0:
        step_size = min(step_size, 0.4 / cfg.gamma)
    burn_in = int(math.ceil(math.log(100.0) / (step_size * cfg.gamma))) if cfg.gamma > 0 else pilot_draws

    report: dict = {"lambda_max": lambda_max, "curvature": curvature, "step_size": step_size}
    for _attempt in range(4):
        pilot_cfg = dataclasses.replace(cfg, step_size=step_size, burn_in=burn_in, thin=1, draws=pilot_draws,
                                        online=False, control_variate=None, params=None)
        pilot = bayesian_influence(model, loss_fn, train_loader, train_samples, queries, config=pilot_cfg,
                                   observable_fn=observable_fn, params=params if params is not None else cfg.params,
                                   progress=False)
        if pilot.diagnostics.rhat < 1.05:
            break
        burn_in *= 2
    d = pilot.diagnostics
    ess = d.ess_per_sample if d.ess_per_sample is not None else torch.tensor([d.ess])
    tau_steps = float(pilot.n_draws / float(np.nanmedian(ess.numpy())))

    steps = cfg.chains * pilot_cfg.steps_per_chain
    step_seconds = max(pilot.sampling_seconds - pilot.n_draws * draw_seconds, 1e-6) / steps
    thin = best_thin(tau_steps, step_seconds, draw_seconds)
    draws = cfg.draws
    if budget_seconds is not None:
        per_draw = cfg.chains * (thin * step_seconds + draw_seconds)
        draws = max(4, int((budget_seconds - cfg.chains * burn_in * step_seconds) / per_draw))
    report.update(tau_steps=tau_steps, step_seconds=step_seconds, draw_seconds=draw_seconds,
                  rhat=d.rhat, ess=d.ess, drift=d.drift_fraction, burn_in=burn_in, thin=thin, draws=draws)
    chosen = dataclasses.replace(cfg, step_size=step_size, burn_in=burn_in, thin=thin, draws=draws)
    return chosen, report


__all__ = ["best_thin", "choose_config", "largest_precision"]
