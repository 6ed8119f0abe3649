"""What :func:`~inrun_shapley.posthoc.bif.bayesian_influence` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from inrun_shapley.posthoc.bif.config import BIFConfig
from inrun_shapley.posthoc.bif.diagnostics import BIFDiagnostics, rank_stability


@dataclass
class BIFResult:
    """Output of :func:`bayesian_influence`.

    Attributes:
        bif: ``[n_train, n_queries]`` (or ``[n_train, n_queries, *token_shape]`` for per-token
            observables) fp64, ``−Cov(ℓ_i, φ_q)`` over the pooled draws, in loss × observable
            units. Positive = including sample i raises φ_q (with φ = query loss: negative =
            i helps q).
        correlation: same shape, ``−Corr(ℓ_i, φ_q)`` (same sign convention, dimensionless);
            ``nan`` where a trace is constant.
        influence: same shape, ``β·bif`` with β = nβ / n: first-order change of the posterior mean
            of φ_q per unit upweighting of sample i in the summed training loss (observable units;
            positive = including i raises φ_q). Ready for LDS-style "sum over the subset"
            predictions.
        diagnostics: :class:`BIFDiagnostics`.
        config: the :class:`BIFConfig` used.
        n_beta: nβ actually used.
        dataset_size: n used for β (None when unknown; then ``influence`` is None).
        n_draws: pooled draws C·T.
        online: whether the online (co-moment) path was used.
        seconds: wall time of the whole call.
        batched: whether the chains ran together (vmapped over stacked parameters).
        sampling_seconds: wall time of the SGLD steps and draws alone (no setup, no reduction).
        observable_named: whether ``observable_fn`` was given (else the observable is the query
            loss, and :attr:`helpfulness` is minus ``influence``).
        tuning: what the ``"auto"`` fields of the config were set to and the measurements behind
            them (:mod:`~inrun_shapley.posthoc.bif.auto`); None when every field was given.

    ``bif``, ``correlation`` and ``influence`` keep the covariance's own sign (positive = raises
    the observable); :attr:`helpfulness` is the one to rank by, oriented like every other score
    of the library (positive = helpful).
    """

    bif: torch.Tensor
    correlation: torch.Tensor
    influence: Optional[torch.Tensor]
    diagnostics: BIFDiagnostics
    config: BIFConfig
    n_beta: float
    dataset_size: Optional[int]
    n_draws: int
    online: bool
    seconds: float
    batched: bool = False
    sampling_seconds: float = float("nan")
    observable_named: bool = False
    tuning: Optional[dict] = None

    @property
    def helpfulness(self) -> np.ndarray:
        """The scores in the library's one orientation: numpy float64 ``[n_train, n_queries,
        *token_shape]``, **positive = helpful**, i.e. including sample i raises query q's
        utility: minus the query loss by default, or the observable you named with
        ``observable_fn`` (then positive = raises it). ``influence`` (``bif`` when the dataset
        size is unknown) with that sign; what every other score of the library returns."""
        base = self.influence if self.influence is not None else self.bif
        sign = 1.0 if self.observable_named else -1.0
        return sign * base.detach().cpu().double().numpy()

    def __repr__(self) -> str:
        """One line (the tensors are summarized by shape; :meth:`summary` has the report)."""
        d = self.diagnostics
        return (f"BIFResult(bif={tuple(self.bif.shape)}, n_draws={self.n_draws}, n_beta={self.n_beta:g}, "
                f"rhat={d.rhat:.3f}, ess={d.ess:.0f}, seconds={self.seconds:.2f})")

    @property
    def draws_per_second(self) -> float:
        """Pooled draws C·T per second of sampling (SGLD steps included)."""
        return self.n_draws / self.sampling_seconds

    def rank_stability(self, other: "BIFResult") -> float:
        """Mean per-observable Spearman between this run's BIF and ``other``'s (see module fn)."""
        return rank_stability(self, other)

    def summary(self) -> str:
        """A short multi-line report of the run with plain-language warnings."""
        cfg, d = self.config, self.diagnostics
        lines = [
            f"Bayesian influence: {self.bif.shape[0]} training samples x "
            f"{int(np.prod(self.bif.shape[1:]))} observables, {cfg.chains} chains x {cfg.draws} draws "
            f"(burn-in {cfg.resolved_burn_in}, thin {cfg.thin}; {self.n_draws} pooled, "
            f"{'online' if self.online else 'in-memory'} accumulation)",
            f"SGLD: step_size={cfg.step_size:g}, n_beta={self.n_beta:g}, gamma={cfg.gamma:g}, "
            f"step_size*gamma={cfg.step_size * cfg.gamma:g}",
            f"traced loss: {d.loss_at_optimum:.4g} at w*, {float(d.loss_trace.mean()):.4g} under the "
            f"posterior (per chain: {', '.join(f'{v:.4g}' for v in d.loss_trace.mean(dim=1).tolist())})",
            f"split-R-hat {d.rhat:.3f}, ESS {d.ess:.0f} of {self.n_draws} draws (traced loss); "
            f"observable: R-hat {d.rhat_observable:.3f}, ESS {d.ess_observable:.0f}",
        ]
        if d.ess_per_sample is not None and d.rhat_per_sample is not None:
            lines.append(
                f"per-sample ESS: min {float(np.nanmin(d.ess_per_sample.numpy())):.0f}, "
                f"median {float(np.nanmedian(d.ess_per_sample.numpy())):.0f}; "
                f"per-sample R-hat max {float(np.nanmax(d.rhat_per_sample.numpy())):.3f}"
            )
        lines.append(
            f"drift |w-w*|/|w*|: mean {100 * d.drift_fraction:.3g}%, max {100 * float(d.drift.max()):.3g}%"
        )
        lines.append(f"time: {self.seconds:.2f} s ({self.draws_per_second:.0f} draws/s, "
                     f"{'batched' if self.batched else 'sequential'} chains"
                     f"{', control variate ' + cfg.control_variate if cfg.control_variate else ''})")
        if self.tuning is not None:
            t = self.tuning
            lines.append(f"auto settings ({', '.join(t['auto'])}): largest minibatch-Hessian eigenvalue "
                         f"{t['curvature']:.3g}, |w*| {t['weight_norm']:.3g} over {t['d']} parameters"
                         + (f", pilot tau {t['tau_steps']:.1f} steps" if "tau_steps" in t else ""))
            if t.get("budget_too_small"):
                lines.append("warning: budget_s leaves fewer than 20 draws per chain; the minimum was used.")
        if not (d.rhat < 1.05):
            lines.append("warning: R-hat >= 1.05: chains disagree; raise burn_in or draws, or gamma.")
        if not (d.ess >= 100):
            lines.append("warning: ESS < 100: few effective draws; raise draws, thin, or step_size.")
        return "\n".join(lines)


__all__ = ["BIFResult"]
