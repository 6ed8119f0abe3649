"""Applying group weights: to cached components, or to in-run values logged per group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.weighting.components import GroupComponents
from inrun_shapley.posthoc.weighting.groups import check_same_names
from inrun_shapley.posthoc.weighting.weights import GroupWeights


def reweigh(
    components: GroupComponents | np.ndarray,
    weights: GroupWeights | np.ndarray | Sequence[float],
) -> np.ndarray:
    """Weighted score ``τ(i, q; w) = Σ_j w_j C_j(i, q)``.

    Args:
        components: :class:`GroupComponents` or a raw ``[G, n_train, n_query]`` array.
        weights: :class:`GroupWeights` (aligned by group name when ``components`` has names)
            or a raw ``[G]`` vector in component order.

    Returns:
        ``[n_train, n_query]`` float64 scores (positive = a step on ``i`` lowers ``q``'s loss),
        directly usable as LDS ``scores``.
    """
    if isinstance(components, GroupComponents):
        values, names = components.values, components.group_names
    else:
        values, names = np.asarray(components, dtype=np.float64), None
        if values.ndim != 3:
            raise ConfigurationError(f"components must be [G, n_train, n_query], got {values.shape}")
    if isinstance(weights, GroupWeights):
        w = weights.aligned(names) if names is not None else weights.weights
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != values.shape[0]:
        raise ConfigurationError(f"{w.shape[0]} weights for {values.shape[0]} component groups")
    return np.tensordot(w, values, axes=(0, 0))


def reweigh_group_values(
    group_values,
    group_names: Sequence[str],
    weights: GroupWeights | Mapping[str, float],
) -> np.ndarray:
    """Re-weigh in-run values logged per parameter group.

    Args:
        group_values: ``[n_ids, G]`` per-sample values split by group (e.g. a value log's
            ``group_values``); units and sign as logged (positive = helpful).
        group_names: the ``G`` column names (e.g. the log's ``group_names``).
        weights: :class:`GroupWeights` or ``{group: weight}``; aligned to the columns by name.

    Returns:
        ``[n_ids]`` float64: ``Σ_j w_j · group_values[:, j]``.

    Raises:
        ConfigurationError: shape mismatch, duplicate names, or the weights' group names differ
            from ``group_names`` (both directions listed).
    """
    values = np.asarray(group_values, dtype=np.float64)
    names = [str(n) for n in group_names]
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ConfigurationError(
            f"group_values must be [n_ids, {len(names)}] (one column per group name), got "
            f"shape {values.shape}"
        )
    if isinstance(weights, GroupWeights):
        w = weights.aligned(names)
    else:
        weights = {str(k): float(v) for k, v in weights.items()}
        check_same_names(names, list(weights), "the logged values", "the weights")
        w = np.array([weights[n] for n in names], dtype=np.float64)
    return values @ w


__all__ = ["reweigh", "reweigh_group_values"]
