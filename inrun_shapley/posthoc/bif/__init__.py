"""Bayesian Influence Function (BIF): post-hoc attribution by sampling a local posterior.

``BIF[i, q] = −Cov(ℓ_i, φ_q)`` under a localized, tempered posterior around the trained weights,
sampled with SGLD; positive = including training sample i raises the observable φ_q. The math,
sign convention and an example are in :mod:`inrun_shapley.posthoc.bif.api`.

Modules:
    api: :func:`bayesian_influence`, the entry point.
    config: :class:`BIFConfig` (sampler settings) and the default nβ.
    sampler: the SGLD chain loop; parameter selection; snapshot and restore of the model.
    batched: the C chains run together (parameters stacked, vmapped).
    functional: the user's functions at given parameters (torch.func), per-sample gradients.
    control_variate: the coupled-Gaussian-chain control variate (unbiased variance reduction).
    tuning: :func:`choose_config`, settings from the sampler's own measurements.
    evaluation: per-sample losses and observables of the traced samples at the current weights.
    moments: pooled covariances from kept traces or online co-moments.
    diagnostics: split-R̂, ESS, seed-to-seed rank stability, :class:`BIFDiagnostics`.
    result: :class:`BIFResult`.
"""

from inrun_shapley.posthoc.bif.api import bayesian_influence
from inrun_shapley.posthoc.bif.config import BIFConfig
from inrun_shapley.posthoc.bif.diagnostics import (
    BIFDiagnostics,
    effective_sample_size,
    rank_stability,
    split_rhat,
)
from inrun_shapley.posthoc.bif.result import BIFResult
from inrun_shapley.posthoc.bif.tuning import best_thin, choose_config

__all__ = [
    "BIFConfig",
    "BIFDiagnostics",
    "BIFResult",
    "bayesian_influence",
    "best_thin",
    "choose_config",
    "effective_sample_size",
    "rank_stability",
    "split_rhat",
]
