"""A bar plot of group weights (matplotlib is imported only when a plot is drawn)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.weighting.weights import GroupWeights


def plot_group_weights(
    weights: GroupWeights | Mapping[str, GroupWeights], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Bar plot of group weights (one bar series per aspect) written as a PNG.

    Uses matplotlib's Agg canvas directly (no global backend change). A dashed line marks the
    uniform weight 1.

    Returns:
        The written path.
    """
    from inrun_shapley.extras import require

    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plots", "plot_group_weights").FigureCanvasAgg
    Figure = require("matplotlib.figure", "plots", "plot_group_weights").Figure

    series = {weights.aspect or "weights": weights} if isinstance(weights, GroupWeights) else dict(weights)
    if not series:
        raise ConfigurationError("plot_group_weights: nothing to plot")
    names = list(next(iter(series.values())).group_names)
    G = len(names)
    fig = Figure(figsize=(max(4.0, 0.5 * G + 2.0), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    xs = np.arange(G)
    for k, (label, gw) in enumerate(series.items()):
        ax.bar(xs + (k - (len(series) - 1) / 2) * width, gw.aligned(names), width, label=label)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("weight (uniform = 1)")
    ax.set_title(title or "learned parameter-group weights")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


__all__ = ["plot_group_weights"]
