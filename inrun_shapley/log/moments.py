"""Per-step moments and the per-step standardization scale (pure functions).

Early steps have much larger values than late ones (the loss falls fast), so raw run totals are
dominated by the first epoch. The log therefore also keeps ``std_sum``: each step's values
divided by that step's *scale*, the population standard deviation (``ddof=0``) of the step's
values over all its samples, per query column. The mean is not subtracted, so signs are kept.
When a step has fewer than two samples, or its standard deviation is zero or not finite, its
scale is 1 (the raw value is added). Moments of the parts of one step (DDP ranks) combine
exactly with Chan et al.'s parallel formula, so a merge recovers the global scale.

Normalizations that need every step's records are computed on read from the raw per-step
records (:func:`normalized_record_sums`; the log keeps raw values only): ``"loss_change"``
divides a step's values by the magnitude of that step's summed value (the linear part of its
validation-loss change, per query column), so each step's values become shares of what the step
did; ``"step_z"`` subtracts the step's mean value and divides by its scale (a per-step z-score:
what is common to every sample of the step, e.g. early-training progress on frequent tokens,
is removed; signs then mean above / below the step's average).
"""

from __future__ import annotations

import numpy as np


def step_moments(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations of one step's values, per query column.

    Args:
        values: ``[n]`` or ``[n, Q]`` float64 values of one step's samples.

    Returns:
        ``(n, mean, m2)`` with ``mean`` and ``m2`` of shape ``values.shape[1:]``; zeros when
        ``n == 0``.
    """
    n = int(values.shape[0])
    if n == 0:
        zero = np.zeros(values.shape[1:], dtype=np.float64)
        return 0, zero, zero.copy()
    mean = values.mean(axis=0)
    m2 = ((values - mean) ** 2).sum(axis=0)
    return n, np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)


def combine_moments(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine per-part moments into those of the union (Chan et al.'s parallel formula).

    Args:
        n: ``[R]`` sample counts of the parts.
        mean: ``[R]`` or ``[R, Q]`` part means.
        m2: like ``mean``, part sums of squared deviations.

    Returns:
        ``(n_total, mean_total, m2_total)``, numerically stable (no ``E[x²] − E[x]²``).
    """
    n = np.asarray(n, dtype=np.float64)
    total = float(n.sum())
    if total == 0:
        return 0, np.zeros(mean.shape[1:]), np.zeros(mean.shape[1:])
    w = n.reshape((-1,) + (1,) * (mean.ndim - 1))
    grand = (w * mean).sum(axis=0) / total
    m2_total = m2.sum(axis=0) + (w * (mean - grand) ** 2).sum(axis=0)
    return int(total), grand, m2_total


def step_scale(n: int, m2: np.ndarray) -> np.ndarray:
    """The divisor of per-step standardization: population std, or 1 where degenerate.

    Args:
        n: number of samples in the step (over all ranks).
        m2: ``[]`` or ``[Q]`` sum of squared deviations of the step's values.

    Returns:
        ``sqrt(m2 / n)`` per query column, replaced by 1 where ``n < 2`` or the std is 0 or
        not finite.
    """
    m2 = np.asarray(m2, dtype=np.float64)
    if n < 2:
        return np.ones_like(m2)
    std = np.sqrt(np.maximum(m2, 0.0) / n)
    return np.where(np.isfinite(std) & (std > 0), std, 1.0)


def is_degenerate(n: int, m2: np.ndarray) -> bool:
    """True when the step's scale falls back to 1 in some column (n < 2, std 0 or not finite)."""
    std = np.sqrt(np.maximum(np.asarray(m2, np.float64), 0.0) / max(n, 1))
    return n < 2 or not bool(np.all(np.isfinite(std) & (std > 0)))


def combine_step_stats(stats: np.ndarray) -> np.ndarray:
    """Per-step statistics of several ranks combined into one row per step.

    Args:
        stats: concatenated stats tables (``step``, ``n``, ``mean``, ``m2``, ``scale``) of the
            ranks, any order.

    Returns:
        One row per distinct step, sorted by step, with the global moments and scale.
    """
    stats = stats[np.argsort(stats["step"], kind="stable")]
    steps, starts = np.unique(stats["step"], return_index=True)
    ends = np.append(starts[1:], stats.shape[0])
    out = np.zeros(steps.shape[0], dtype=stats.dtype)
    for k, (a, b) in enumerate(zip(starts, ends)):
        part = stats[a:b]
        n, mean, m2 = combine_moments(part["n"], part["mean"], part["m2"])
        out[k]["step"], out[k]["n"], out[k]["mean"], out[k]["m2"] = steps[k], n, mean, m2
        out[k]["scale"] = step_scale(n, m2)
    return out


RECORD_NORMALIZATIONS = ("step_std", "loss_change", "step_z")


def step_divisors(stats: np.ndarray, normalize: str) -> tuple[np.ndarray, np.ndarray]:
    """Per step row of ``stats``, what is subtracted from and what divides its values.

    Args:
        stats: per-step statistics (``step``, ``n``, ``mean``, ``m2``, ``scale``), one row per step.
        normalize: one of :data:`RECORD_NORMALIZATIONS`.

    Returns:
        ``(shift, divisor)``, each ``[T]`` or ``[T, Q]``: ``step_std``: (0, scale);
        ``loss_change``: (0, |n · mean|, 1 where zero or not finite); ``step_z``: (mean, scale).
    """
    if normalize not in RECORD_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {RECORD_NORMALIZATIONS}, got {normalize!r}")
    mean = np.asarray(stats["mean"], dtype=np.float64)
    scale = np.asarray(stats["scale"], dtype=np.float64)
    zero = np.zeros_like(mean)
    if normalize == "step_std":
        return zero, scale
    if normalize == "step_z":
        return mean, scale
    n = stats["n"].astype(np.float64).reshape((-1,) + (1,) * (mean.ndim - 1))
    change = np.abs(mean * n)
    return zero, np.where(np.isfinite(change) & (change > 0), change, 1.0)


def normalized_record_sums(records: np.ndarray, stats: np.ndarray, normalize: str) -> tuple[np.ndarray, np.ndarray]:
    """Per id, the sum over its per-step records of ``(value − shift_step) / divisor_step``.

    Args:
        records: per-step records (``step``, ``id``, ``value`` ``[]`` or ``[Q]``).
        stats: per-step statistics with a row for every step of ``records`` (any order).
        normalize: one of :data:`RECORD_NORMALIZATIONS` (module docstring).

    Returns:
        ``(ids [n] sorted, sums [n] or [n, Q])`` float64 over the ids present in ``records``.

    Raises:
        ValueError: unknown normalization, or a record's step has no statistics row.
    """
    order = np.argsort(stats["step"], kind="stable")
    stats = stats[order]
    shift, divisor = step_divisors(stats, normalize)
    row = np.searchsorted(stats["step"], records["step"])
    found = row < stats.shape[0]
    found[found] = stats["step"][row[found]] == records["step"][found]
    if not found.all():
        raise ValueError("some records have steps without statistics rows")
    values = (np.asarray(records["value"], dtype=np.float64) - shift[row]) / divisor[row]
    ids, where = np.unique(records["id"], return_inverse=True)
    sums = np.zeros((ids.shape[0],) + values.shape[1:], dtype=np.float64)
    np.add.at(sums, where, values)
    return ids, sums


__all__ = ["RECORD_NORMALIZATIONS", "combine_moments", "combine_step_stats", "is_degenerate", "normalized_record_sums",
           "step_divisors", "step_moments", "step_scale"]
