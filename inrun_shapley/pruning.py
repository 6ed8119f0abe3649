"""Pruning a training set with logged values: which sample ids to keep.

Ids are dataset indices: the ids the engine logged are the indices the training ``Dataset`` is
indexed with, so ``subset(dataset, prune(log, fraction=0.2))`` is the pruned dataset.

Ranking uses :meth:`ShapleyLog.helpfulness`: the log's scores with ``normalize="step_std"`` by
default (per-step standardized sums; raw sums are dominated by the first epoch, docs/math.md
§1.4), times the ``helpful_sign`` its header declares, so that higher = more valuable whatever
the log holds (In-Run Shapley values: +1; adjoint influence on a loss: -1). It is the default
ranking of :meth:`ShapleyLog.top` and of ``inrun-shapley report`` too (:meth:`ShapleyLog.ranking`
names it). A log whose sign is unknown (null) is refused. The least helpful samples are dropped.

When to balance classes: on a training set with label noise, the lowest values mark the
mislabeled samples wherever they are, and a plain cut removes them. On a *clean* training set
the lowest values mark the easiest or most redundant samples, which cluster in a few classes:
a plain cut can then empty or thin those classes and do worse than random pruning. Pass
``class_balanced=True`` (CLI ``--class-balanced``) there, to drop the fraction within each
class. Given ``labels``, :func:`prune` warns (:class:`ClassSkewWarning`) when a plan drops more
than twice the overall fraction from some class or empties one.

Example:
    >>> import numpy as np
    >>> scores = np.array([0.3, -0.2, 0.1, np.nan, 0.0])   # id 3 was never seen
    >>> prune(scores, fraction=0.5).tolist()                # drops 0.5 * 4 = 2 of the 4 seen ids
    [0, 2, 3]
    >>> prune(scores, drop_negative=True, unseen="drop").tolist()
    [0, 2, 4]
    >>> prune(scores, fraction="auto").tolist()             # the negative-value rule
    [0, 2, 3, 4]
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy as np

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.log import NORMALIZATIONS, ShapleyLog
from inrun_shapley.log.accumulator import dense_allowed

UNSEEN_POLICIES = ("keep", "drop")
SKEW_FACTOR = 2.0  # a class losing more than this times the overall fraction is reported


class ClassSkewWarning(UserWarning):
    """A pruning plan removes far more of some class than overall, or all of it."""


AUTO = "auto"  # fraction="auto": the negative-value rule (drop every seen id with value < 0)


def _check_fraction(fraction: Any) -> float | None:
    if fraction is None:
        return None
    if isinstance(fraction, str):
        raise ConfigurationError(
            f"fraction must be a number in [0, 1] or {AUTO!r} (drop every sample with a negative value), "
            f"got {fraction!r}"
        )
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ConfigurationError(f"fraction must be a number in [0, 1], got {fraction!r}")
    value = float(fraction)
    if not np.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return value


def _scored(log_or_scores: Any, normalize: str) -> tuple[np.ndarray, np.ndarray, int | None, str]:
    """``(seen ids [n] sorted, their helpfulness [n], default universe size or None, what)``.

    The default universe is ``range(len(scores))`` for an array, ``range(max_id + 1)`` for a
    log whose ids are dense enough (None when they are sparse: hashes, global row numbers).
    """
    if normalize not in NORMALIZATIONS:
        raise ConfigurationError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if isinstance(log_or_scores, ShapleyLog):
        log = log_or_scores
        helpful = log.helpfulness(normalize, query="mean", ids=log.ids, purpose="prune()")
        size = log.max_id + 1 if dense_allowed(log.max_id, log.ids.size) else None
        return log.ids.copy(), helpful, size, "the log"
    seen, seen_scores = array_scores(log_or_scores)
    return seen, seen_scores, np.asarray(log_or_scores).shape[0], "the scores"


def array_scores(scores: Any, index: str = "id") -> tuple[np.ndarray, np.ndarray]:
    """``(seen ids [n] sorted, their scores [n] float64)`` of a 1-D score array indexed by
    ``index`` (NaN marks ids never seen).

    Raises:
        ConfigurationError: not a 1-D numeric array, or an inf in it.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
        raise ConfigurationError(
            f"scores must be a ShapleyLog or a 1-D numeric array indexed by {index}, got shape "
            f"{scores.shape} dtype {scores.dtype}"
        )
    scores = scores.astype(np.float64)
    if np.any(np.isinf(scores)):
        raise ConfigurationError(f"scores contain inf; use NaN for {index}s never seen")
    seen = np.flatnonzero(~np.isnan(scores)).astype(np.int64)
    return seen, scores[seen]


def _universe(ids: Any, seen: np.ndarray, size: int | None, unseen: str, what: str) -> np.ndarray:
    """The dataset ids to choose from (see ``prune``'s ``ids``)."""
    max_id = int(seen[-1]) if seen.size else -1
    if ids is None:
        if size is not None:
            return np.arange(size, dtype=np.int64)
        if unseen == "drop":
            return seen
        raise SampleIdError(
            f"{what} has sparse ids (largest {max_id}, {seen.size} seen): the default universe "
            f"range({max_id + 1}) is too large. Pass ids=<array of the dataset's ids>, or unseen='drop'"
        )
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        if ids < 0:
            raise SampleIdError(f"ids must be a count >= 0 or an array of ids, got {ids!r}")
        if ids <= max_id:
            raise SampleIdError(
                f"ids={ids} means the dataset has ids [0, {ids}), but {what} has scores for ids up to "
                f"{max_id}: pass the size of the dataset the values were computed on (>= {max_id + 1}), "
                "or an array of ids to restrict the choice to them"
            )
        return np.arange(int(ids), dtype=np.int64)
    universe = np.asarray(ids)
    if universe.ndim != 1 or (universe.size and not np.issubdtype(universe.dtype, np.integer)):
        raise SampleIdError(f"ids must be a 1-D integer array, got shape {universe.shape}")
    universe = universe.astype(np.int64)
    if universe.size and universe.min() < 0:
        raise SampleIdError("ids must be non-negative dataset indices")
    if np.unique(universe).shape[0] != universe.shape[0]:
        raise SampleIdError("ids contain duplicates")
    return universe


def _labels_of(labels: Any, cand: np.ndarray) -> np.ndarray:
    """The checked label array (indexed by id) covering every candidate id."""
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ConfigurationError(f"labels must be 1-D indexed by id, got shape {lab.shape}")
    if cand.size and lab.shape[0] <= cand.max():
        raise ConfigurationError(f"labels has {lab.shape[0]} entries but ids up to {int(cand.max())} are scored")
    return lab


def _warn_if_skewed(lab: np.ndarray, cand: np.ndarray, drop_mask: np.ndarray, kept_unseen: np.ndarray,
                    class_balanced: bool, drop_negative: bool) -> None:
    """Warn when the plan drops more than ``SKEW_FACTOR`` times the overall fraction of the
    scored ids of some class, or leaves a class with no id at all."""
    n_drop = int(drop_mask.sum())
    if n_drop == 0:
        return
    overall = n_drop / cand.shape[0]
    cand_labels = lab[cand]
    classes, n_class = np.unique(cand_labels, return_counts=True)
    d_class = np.bincount(np.searchsorted(classes, cand_labels[drop_mask]), minlength=classes.shape[0])
    unseen_labels = lab[kept_unseen[kept_unseen < lab.shape[0]]]
    emptied = (d_class == n_class) & ~np.isin(classes, unseen_labels)
    skewed = d_class > SKEW_FACTOR * overall * n_class
    bad = np.flatnonzero(emptied | skewed)
    if bad.size == 0:
        return
    shown = [
        f"class {classes[j]!s}: {d_class[j]} of {n_class[j]}" + (" (emptied)" if emptied[j] else "")
        for j in bad[np.argsort(-(d_class[bad] / n_class[bad]), kind="stable")][:8]
    ]
    more = f" and {bad.size - 8} more" if bad.size > 8 else ""
    if not class_balanced:
        hint = ("pass class_balanced=True to drop the same fraction within each class (recommended on a "
                "clean training set, where the lowest values cluster in a few classes)")
    elif drop_negative:
        hint = "drop_negative=True drops every harmful sample whatever its class; leave it off to keep the balance"
    else:
        hint = "these classes have too few scored samples for an even split at this fraction"
    warnings.warn(
        f"pruning drops {n_drop} of {cand.shape[0]} scored samples ({overall:.1%}) but "
        f"{'; '.join(shown)}{more}: {hint}",
        ClassSkewWarning, stacklevel=3,
    )


def _lowest(ids: np.ndarray, scores: np.ndarray, n_drop: int) -> np.ndarray:
    """The ``n_drop`` ids with the lowest score; ties dropped in ascending id order."""
    if n_drop <= 0:
        return ids[:0]
    order = np.lexsort((ids, scores))
    return ids[order[:n_drop]]


def prune(
    log_or_scores: ShapleyLog | np.ndarray,
    *,
    fraction: float | str | None = None,
    drop_negative: bool = False,
    keep_top: int | None = None,
    normalize: str = "step_std",
    labels: Any = None,
    class_balanced: bool = False,
    ids: Any = None,
    unseen: str = "keep",
) -> np.ndarray:
    """Ids to keep after dropping the least valuable samples.

    Candidates for dropping are the ids the log has seen; ids never seen are kept or dropped
    as a block according to ``unseen`` (by default kept: no evidence against them).

    Args:
        log_or_scores: a :class:`ShapleyLog` (ranked by its declared ``helpful_sign``), or a
            1-D score array indexed by id (higher = more valuable; NaN marks ids never seen).
            Per-query logs are ranked by the mean over queries.
        fraction: drop the ``floor(fraction * n + 0.5)`` (nearest, halves up) lowest-scored of
            the ``n`` seen candidates (within each class when ``class_balanced``). 0 keeps
            all, 1 drops every seen id. ``"auto"``: the negative-value rule of In-Run Data
            Shapley (2406.11011 §5.3.1): drop every seen id whose score is < 0, the same as
            ``drop_negative=True`` alone (the share dropped is then the share of negative
            scores).
        drop_negative: also drop every seen id whose score is < 0 (harmful on balance).
        keep_top: keep only the ``keep_top`` highest-scored seen ids (exclusive with
            ``fraction``).
        normalize: ``"step_std"`` (recommended), ``"none"`` or ``"mean"``; see
            :meth:`ShapleyLog.scores`. Ignored for score arrays.
        labels: ``[> largest scored id]`` class label per id (indexed by id). Used by
            ``class_balanced``, and to warn (:class:`ClassSkewWarning`) when the plan drops more
            than twice the overall fraction of some class's scored ids or removes every id of a
            class. Without labels nothing is checked.
        class_balanced: apply ``fraction`` / ``keep_top`` within each class
            (``keep_top`` then keeps that many per class). Recommended on a clean training set
            (see the module docstring); leave it off to remove label noise.
        ids: the full set of dataset ids (array), or an int ``n`` for ``range(n)``; ``n``
            must exceed the largest scored id (a smaller ``n`` means the scores belong to
            another dataset, and is refused). Without it the universe is
            ``range(len(scores))`` (a log: ``range(max_id + 1)``), so ids above the largest
            scored id are not returned: pass ``ids=len(dataset)`` to keep never-seen ids beyond
            it. A log with sparse ids (hashes, global row numbers: see
            :mod:`inrun_shapley.log.accumulator`) needs ``ids=<array>`` or ``unseen="drop"``.
        unseen: ``"keep"`` or ``"drop"`` the ids never seen by the log.

    Returns:
        Sorted int64 array of the ids to keep.

    Raises:
        ConfigurationError: bad ``fraction``, ``keep_top``, ``normalize``, ``unseen``, no
            pruning rule given, ``class_balanced`` without ``labels``, or ``labels`` not 1-D
            or too short for the scored ids.
        SampleIdError: negative or duplicated ``ids``; ``ids=n`` not above the largest
            scored id; no ``ids`` for a log with sparse ids and ``unseen="keep"``.
        LogError: the log's score description has ``helpful_sign`` null.

    Warns:
        ClassSkewWarning: given ``labels``, the plan drops more than twice the overall fraction
            from some class or empties one; the message names the classes.
    """
    if isinstance(fraction, str) and fraction == AUTO:
        fraction, drop_negative = None, True
    frac = _check_fraction(fraction)
    if keep_top is not None and (
        isinstance(keep_top, bool) or not isinstance(keep_top, numbers.Integral) or keep_top < 0
    ):
        raise ConfigurationError(f"keep_top must be an int >= 0, got {keep_top!r}")
    if frac is not None and keep_top is not None:
        raise ConfigurationError("pass either fraction or keep_top, not both")
    if frac is None and keep_top is None and not drop_negative:
        raise ConfigurationError("nothing to prune: pass fraction, keep_top or drop_negative=True")
    if unseen not in UNSEEN_POLICIES:
        raise ConfigurationError(f"unseen must be one of {UNSEEN_POLICIES}, got {unseen!r}")

    seen, seen_scores, size, what = _scored(log_or_scores, normalize)
    universe = _universe(ids, seen, size, unseen, what)
    pos = np.minimum(np.searchsorted(seen, universe), max(seen.size - 1, 0))
    is_seen = seen[pos] == universe if seen.size else np.zeros(universe.shape[0], dtype=bool)
    cand = universe[is_seen]
    cand_scores = seen_scores[pos[is_seen]]

    drop_mask = np.zeros(cand.shape[0], dtype=bool)
    if drop_negative:
        drop_mask |= cand_scores < 0

    if frac is not None or keep_top is not None:
        if class_balanced:
            if labels is None:
                raise ConfigurationError("class_balanced=True needs labels (indexed by id)")
            cand_labels = _labels_of(labels, cand)[cand]
            groups = [np.flatnonzero(cand_labels == c) for c in np.unique(cand_labels)]
        else:
            groups = [np.arange(cand.shape[0])]
        for idx in groups:
            n = idx.shape[0]
            n_drop = int(np.floor(frac * n + 0.5)) if frac is not None else max(n - keep_top, 0)
            dropped = _lowest(cand[idx], cand_scores[idx], n_drop)
            drop_mask[idx] |= np.isin(cand[idx], dropped)
    elif class_balanced:
        raise ConfigurationError("class_balanced applies to fraction or keep_top; pass one of them")

    keep = [cand[~drop_mask]]
    if unseen == "keep":
        keep.append(universe[~is_seen])
    if labels is not None and cand.size:
        _warn_if_skewed(_labels_of(labels, cand), cand, drop_mask, keep[1] if len(keep) > 1 else cand[:0],
                        class_balanced, drop_negative)
    return np.sort(np.concatenate(keep)).astype(np.int64)


def subset(dataset: Any, keep_ids: Any):
    """The pruned dataset: ``torch.utils.data.Subset(dataset, keep_ids)``.

    Args:
        dataset: a map-style dataset whose indices are the logged sample ids.
        keep_ids: ids to keep, e.g. from :func:`prune`.

    Returns:
        A ``torch.utils.data.Subset`` over ``keep_ids`` in the given order.

    Raises:
        SampleIdError: an id is negative or not below ``len(dataset)``.
    """
    from torch.utils.data import Subset

    keep = np.asarray(keep_ids, dtype=np.int64).ravel()
    if keep.size:
        n = len(dataset) if hasattr(dataset, "__len__") else None
        if keep.min() < 0 or (n is not None and keep.max() >= n):
            raise SampleIdError(
                f"keep_ids must be indices of the dataset in [0, {n}); got range "
                f"[{int(keep.min())}, {int(keep.max())}]"
            )
    return Subset(dataset, keep.tolist())


__all__ = ["ClassSkewWarning", "prune", "subset", "UNSEEN_POLICIES"]
