"""Matplotlib plotting helpers for the CLI and the demo (PNG files).

Every function writes one PNG and returns its path; none opens a window. Figures are built with
matplotlib's object-oriented API (a bare ``Figure`` drawn by ``FigureCanvasAgg``), never
``pyplot``: no backend is selected or changed, nothing is left in pyplot's figure registry, and
it works on headless machines. Matplotlib is imported inside the functions, on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from inrun_shapley.errors import ConfigurationError


def _figure(figsize: tuple[float, float] = (6, 4)):
    """A new ``(figure, axes)`` pair drawn by the Agg canvas, outside pyplot."""
    from inrun_shapley.extras import require

    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plots", "plotting").FigureCanvasAgg
    fig = require("matplotlib.figure", "plots", "plotting").Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _as_groups(scores: np.ndarray, groups: Any) -> dict[str, np.ndarray]:
    """Normalize ``groups`` to {name: scores of that group}."""
    if groups is None:
        return {"all": scores}
    if isinstance(groups, Mapping):
        out = {}
        for name, mask in groups.items():
            mask = np.asarray(mask)
            if mask.shape != scores.shape:
                raise ConfigurationError(
                    f"group {name!r} mask has shape {mask.shape}, scores have {scores.shape}"
                )
            out[str(name)] = scores[mask.astype(bool)]
        return out
    labels = np.asarray(groups)
    if labels.shape != scores.shape:
        raise ConfigurationError(f"groups has shape {labels.shape}, scores have {scores.shape}")
    if labels.dtype == bool:
        return {"flagged": scores[labels], "other": scores[~labels]}
    return {str(c): scores[labels == c] for c in np.unique(labels)}


def plot_value_histogram(
    scores: Any,
    path: str | os.PathLike,
    groups: Any = None,
    *,
    bins: int = 50,
    title: str = "Distribution of sample values",
    xlabel: str = "value (positive = reduced validation loss)",
) -> Path:
    """Histogram of per-sample scores, optionally one overlay per group.

    Args:
        scores: ``[n]`` scores (e.g. ``log.scores()[log.ids]``).
        path: PNG file to write.
        groups: None; a boolean mask ``[n]`` (e.g. flipped labels: overlays "flagged" and
            "other"); an integer/str label array ``[n]``; or a dict ``{name: bool mask [n]}``.
            With groups, each overlay is normalized to unit area so unequal sizes compare.
        bins: number of bins shared by all groups.
        title: figure title.
        xlabel: x-axis label.

    Returns:
        The written path.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    parts = _as_groups(scores, groups)
    finite = scores[np.isfinite(scores)]
    edges = np.histogram_bin_edges(finite if finite.size else np.zeros(1), bins=bins)
    fig, ax = _figure()
    for name, vals in parts.items():
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            continue
        label = f"{name} (n={vals.size})" if groups is not None else None
        ax.hist(
            vals,
            bins=edges,
            alpha=0.55 if groups is not None else 0.9,
            label=label,
            density=groups is not None,
        )
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (each group)" if groups is not None else "samples")
    ax.set_title(title)
    if groups is not None:
        ax.legend()
    return _save(fig, path)


def plot_cumulative_value(
    scores: Any, path: str | os.PathLike, *, title: str = "Cumulative value, most valuable first"
) -> Path:
    """Cumulative sum of scores sorted from the most to the least valuable sample.

    A curve that peaks before the end and then falls shows the harmful tail: the samples past
    the peak have negative scores.

    Args:
        scores: ``[n]`` scores of the seen samples.
        path: PNG file to write.
        title: figure title.

    Returns:
        The written path.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    ordered = np.sort(scores[np.isfinite(scores)])[::-1]
    fig, ax = _figure()
    x = np.arange(1, ordered.size + 1) / max(ordered.size, 1)
    ax.plot(x, np.cumsum(ordered), lw=1.5)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("fraction of samples (sorted by value, descending)")
    ax.set_ylabel("cumulative value")
    ax.set_title(title)
    return _save(fig, path)


def plot_step_values(
    steps: Any, totals: Any, path: str | os.PathLike, *, title: str = "Value per optimizer step"
) -> Path:
    """Sum of the samples' values per step (early steps dominate raw totals).

    Args:
        steps: ``[T]`` optimizer steps.
        totals: ``[T]`` (or ``[T, Q]``, averaged over queries) sum of values of each step, in
            validation-loss units.
        path: PNG file to write.
        title: figure title.

    Returns:
        The written path.
    """
    steps = np.asarray(steps).ravel()
    totals = np.asarray(totals, dtype=np.float64)
    if totals.ndim == 2:
        totals = totals.mean(axis=1)
    if totals.shape != steps.shape:
        raise ConfigurationError(f"steps {steps.shape} and totals {totals.shape} differ")
    fig, ax = _figure()
    ax.plot(steps, totals, lw=1.0)
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sum of values (validation-loss drop, linear part)")
    ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_vs_fraction(
    table: Any,
    path: str | os.PathLike,
    *,
    title: str = "Accuracy after pruning",
    ylabel: str = "test accuracy",
) -> Path:
    """Accuracy of models retrained on pruned data against the pruned fraction, per method.

    Args:
        table: either a dict ``{method: (fractions, accuracies)}`` or
            ``{method: (fractions, accuracies, stds)}``, or a pandas DataFrame (or dict of
            columns) with ``method``, ``fraction``, ``accuracy`` and optionally ``std``
            columns (several rows per (method, fraction), e.g. seeds, are averaged, and their
            standard deviation drawn when no ``std`` column is given).
        path: PNG file to write.
        title: figure title.
        ylabel: y-axis label.

    Returns:
        The written path.

    Raises:
        ConfigurationError: the table has neither form.
    """
    series = _accuracy_series(table)
    fig, ax = _figure()
    for method, (fr, acc, std) in series.items():
        order = np.argsort(fr)
        fr, acc = fr[order], acc[order]
        ax.plot(fr, acc, marker="o", label=method)
        if std is not None:
            std = std[order]
            ax.fill_between(fr, acc - std, acc + std, alpha=0.2)
    ax.set_xlabel("fraction of training samples pruned")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def _accuracy_series(table: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
        table = {c: np.asarray(table[c]) for c in table.columns}
    if not isinstance(table, Mapping) or not table:
        raise ConfigurationError("table must be a non-empty dict or DataFrame")
    if {"method", "fraction", "accuracy"} <= set(table):
        method = np.asarray(table["method"]).astype(str)
        frac = np.asarray(table["fraction"], dtype=np.float64)
        acc = np.asarray(table["accuracy"], dtype=np.float64)
        given_std = np.asarray(table["std"], dtype=np.float64) if "std" in table else None
        out = {}
        for m in dict.fromkeys(method):  # keep first-seen order
            sel = method == m
            fr_u = np.unique(frac[sel])
            mean = np.array([acc[sel & (frac == f)].mean() for f in fr_u])
            if given_std is not None:
                std = np.array([given_std[sel & (frac == f)].mean() for f in fr_u])
            else:
                std = np.array([acc[sel & (frac == f)].std() for f in fr_u])
                std = std if np.any(std > 0) else None
            out[m] = (fr_u, mean, std)
        return out
    out = {}
    for m, val in table.items():
        if not isinstance(val, (tuple, list)) or len(val) not in (2, 3):
            raise ConfigurationError(
                "table must map method -> (fractions, accuracies[, stds]) or have columns "
                f"method/fraction/accuracy; got {type(val).__name__} for {m!r}"
            )
        fr = np.asarray(val[0], dtype=np.float64)
        acc = np.asarray(val[1], dtype=np.float64)
        std = np.asarray(val[2], dtype=np.float64) if len(val) == 3 else None
        if fr.shape != acc.shape or (std is not None and std.shape != fr.shape):
            raise ConfigurationError(f"method {m!r}: fractions and accuracies differ in length")
        out[str(m)] = (fr, acc, std)
    return out


def plot_top_bottom(
    ids: Sequence[int] | np.ndarray,
    scores: Any,
    path: str | os.PathLike,
    *,
    k: int = 10,
    title: str = "Most and least valuable samples",
) -> Path:
    """Horizontal bars of the ``k`` highest and ``k`` lowest scored ids.

    Args:
        ids: ``[n]`` sample ids.
        scores: ``[n]`` their scores.
        path: PNG file to write.
        k: how many at each end.
        title: figure title.

    Returns:
        The written path.
    """
    ids = np.asarray(ids).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if ids.shape != scores.shape:
        raise ConfigurationError(f"ids {ids.shape} and scores {scores.shape} differ")
    order = np.lexsort((ids, -scores))
    pick = np.concatenate([order[:k], order[max(k, order.size - k) :]])
    fig, ax = _figure((6, max(3, 0.25 * pick.size + 1)))
    y = np.arange(pick.size)[::-1]
    colors = ["tab:green" if s >= 0 else "tab:red" for s in scores[pick]]
    ax.barh(y, scores[pick], color=colors)
    ax.set_yticks(y, [str(i) for i in ids[pick]])
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("value")
    ax.set_ylabel("sample id")
    ax.set_title(title)
    return _save(fig, path)


__all__ = [
    "plot_accuracy_vs_fraction",
    "plot_cumulative_value",
    "plot_step_values",
    "plot_top_bottom",
    "plot_value_histogram",
]
