"""Learned parameter-group weights for gradient-based attribution (post-hoc)."""

from inrun_shapley.posthoc.weighting._weighting import (  # noqa: F401
    ParameterGroups,
    GroupComponents,
    GroupWeights,
    FitConfig,
    adam_preconditioner,
    compute_group_components,
    group_weight_objective,
    fit_weights,
    fit_group_weights,
    reweigh,
    reweigh_group_values,
    plot_group_weights,
)

__all__ = ['ParameterGroups', 'GroupComponents', 'GroupWeights', 'FitConfig', 'adam_preconditioner', 'compute_group_components', 'group_weight_objective', 'fit_weights', 'fit_group_weights', 'reweigh', 'reweigh_group_values', 'plot_group_weights']
