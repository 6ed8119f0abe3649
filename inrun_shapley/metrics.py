"""Evaluation metrics shared by the tests, the demo and the benchmarks.

All functions take numpy arrays (or anything ``np.asarray`` accepts) and return floats or
numpy arrays. Rank statistics use average ranks for ties. Bad shapes or labels raise
:class:`~inrun_shapley.errors.ConfigurationError` (a ``ValueError``).
"""

from __future__ import annotations

import numpy as np

from inrun_shapley.errors import ConfigurationError


def rankdata(a) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as ``scipy.stats.rankdata``); all NaN when
    ``a`` holds a NaN. numpy only: the core install has no scipy."""
    a = np.asarray(a, dtype=np.float64).ravel()
    if np.isnan(a).any():
        return np.full(a.shape, np.nan)
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    ends = np.append(starts[1:], a.size)
    ranks = np.empty(a.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D arrays; ``nan`` when either is constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ConfigurationError(f"pearson: shapes differ: {x.shape} vs {y.shape}; pass two arrays of the same length.")
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two 1-D arrays."""
    return pearson(rankdata(np.asarray(x).ravel()), rankdata(np.asarray(y).ravel()))


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positives``.

    Higher scores should mean "more likely positive". Equivalent to the probability that a random
    positive outranks a random negative (ties count one half).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigurationError(
            f"roc_auc needs at least one positive and one negative label, got {n_pos} positive and {n_neg} negative."
        )
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def linear_datamodeling_score(scores, subsets, outputs, *, output_kind: str = "utility") -> float:
    """Linear datamodeling score (LDS), averaged over queries.

    Args:
        scores: ``[n_train, n_queries]`` attribution scores in the library's one orientation:
            positive = helpful, i.e. including the training sample raises the query's utility
            (every score the library returns at its defaults).
        subsets: ``[n_models, n_train]`` boolean masks, the training subset of each retrained model.
        outputs: ``[n_models, n_queries]`` measured query outputs of each model.
        output_kind: ``"utility"`` (default: ``outputs`` are higher-is-better, e.g. a margin, a
            log-probability or minus a loss) or ``"loss"`` (``outputs`` are losses; the
            correlation is taken with minus them).

    Returns:
        Mean over queries of the Spearman correlation, across models, between the predicted
        output ``sum_{i in subset} scores[i, q]`` and the measured one.
    """
    if output_kind not in ("utility", "loss"):
        raise ConfigurationError(f"output_kind must be 'utility' or 'loss', got {output_kind!r}")
    scores = np.asarray(scores, dtype=np.float64)
    subsets = np.asarray(subsets, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    if output_kind == "loss":
        outputs = -outputs
    if scores.ndim != 2 or subsets.ndim != 2 or outputs.ndim != 2:
        raise ConfigurationError(
            "LDS needs 2-D scores [n_train, Q], subsets [M, n_train], outputs [M, Q]; got "
            f"{scores.shape}, {subsets.shape}, {outputs.shape}."
        )
    if subsets.shape[1] != scores.shape[0] or outputs.shape != (subsets.shape[0], scores.shape[1]):
        raise ConfigurationError(
            f"LDS shapes disagree: scores {scores.shape}, subsets {subsets.shape}, outputs {outputs.shape}"
        )
    predicted = subsets @ scores
    per_query = [spearman(predicted[:, q], outputs[:, q]) for q in range(scores.shape[1])]
    return float(np.nanmean(per_query))


__all__ = ["pearson", "rankdata", "spearman", "roc_auc", "linear_datamodeling_score"]
