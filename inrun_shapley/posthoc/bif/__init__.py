"""Bayesian Influence Function (BIF): post-hoc attribution by sampling a local posterior."""

from inrun_shapley.posthoc.bif._bif import (  # noqa: F401
    BIFConfig,
    BIFDiagnostics,
    BIFResult,
    bayesian_influence,
    effective_sample_size,
    rank_stability,
    split_rhat,
)

__all__ = ['BIFConfig', 'BIFDiagnostics', 'BIFResult', 'bayesian_influence', 'effective_sample_size', 'rank_stability', 'split_rhat']
