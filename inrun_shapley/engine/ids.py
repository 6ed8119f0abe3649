"""Sample ids: checked once, the same way for the tracker and the framework adapters."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.errors import SampleIdError
from inrun_shapley.log.accumulator import refuse_ids_above_int64

__all__ = ["as_sample_ids", "sum_occurrences"]

_CHECKED: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def as_sample_ids(ids: Any) -> Tensor:
    """The sample ids of one (micro-)batch as a checked ``[n]`` int64 CPU tensor.

    Args:
        ids: one integer id per row of the batch: a tensor (any device), array or list.

    Raises:
        SampleIdError: ids missing, empty, not 1-D, not integers, negative, or 2**63 or more
            (repeats are allowed: each occurrence is a player, see :func:`sum_occurrences`); the
            message says what to pass instead.
    """
    if ids is None:
        raise SampleIdError(
            "no sample ids for this batch: pass one integer id per row, e.g. "
            "tracker.batch(batch['index']) (wrap your dataset with inrun_shapley.IndexedDataset to get them)"
        )
    if isinstance(ids, Tensor) and _CHECKED.get(id(ids)) is ids:
        return ids  # returned by this function already (the tracker and its capture session both ask)
    # ids are host data: one read of a tensor (a device tensor is copied once), then checked in numpy
    raw = (ids.detach().cpu() if ids.device.type != "cpu" else ids.detach()).numpy() if isinstance(ids, Tensor) \
        else ids
    refuse_ids_above_int64(raw, "sample ids")
    a = np.asarray(raw)
    if a.ndim != 1:
        raise SampleIdError(f"sample ids must be a 1-D sequence with one id per row, got shape {tuple(a.shape)}")
    if a.size == 0:
        raise SampleIdError("the batch has no sample ids (empty)")
    if a.dtype.kind not in "iu":
        kind = "torch.bool" if a.dtype == bool else (str(ids.dtype) if isinstance(ids, Tensor) else str(a.dtype))
        raise SampleIdError(f"sample ids must be integers, got dtype {kind}")
    a = a.astype(np.int64, copy=True)
    if (a < 0).any():
        raise SampleIdError(f"sample ids must be non-negative, got {a[a < 0][:5].tolist()}")
    t = torch.from_numpy(a)
    _CHECKED[id(t)] = t
    return t


def sum_occurrences(ids: np.ndarray, values: np.ndarray, groups: np.ndarray | None):
    """One row per id: a step's values summed over each id's occurrences.

    With sampling with replacement (``torch.randint`` batches, ``WeightedRandomSampler(
    replacement=True)``) one sample may fill several rows of a step, in one micro-batch or
    across several. Each occurrence is a player of the step's game and is valued on its own
    row; the id's value for the step is the sum over its occurrences (docs/math.md §1).

    Args:
        ids: ``[r]`` int64, one per scored row (repeats allowed).
        values: ``[r]`` or ``[r, Q]`` float64 aligned to ``ids``.
        groups: ``[r, G]`` or None.

    Returns:
        ``(ids [n] sorted unique, values [n]/[n, Q], groups [n, G] | None, counts)``, with
        ``counts`` ``[n]`` int64 occurrences per id, or ``None`` (and the inputs unchanged)
        when no id repeats.
    """
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if uniq.shape[0] == ids.shape[0]:
        return ids, values, groups, None
    summed = np.zeros((uniq.shape[0], *values.shape[1:]), dtype=values.dtype)
    np.add.at(summed, inverse, values)
    if groups is not None:
        g = np.zeros((uniq.shape[0], *groups.shape[1:]), dtype=groups.dtype)
        np.add.at(g, inverse, groups)
        groups = g
    return uniq, summed, groups, counts.astype(np.int64)
