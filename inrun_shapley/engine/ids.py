"""Sample ids: checked once, the same way for the tracker and the framework adapters."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.errors import SampleIdError
from inrun_shapley.log.accumulator import refuse_ids_above_int64

__all__ = ["as_sample_ids", "check_disjoint"]

_CHECKED: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def as_sample_ids(ids: Any) -> Tensor:
    """The sample ids of one (micro-)batch as a checked ``[n]`` int64 CPU tensor.

    Args:
        ids: one integer id per row of the batch: a tensor (any device), array or list.

    Raises:
        SampleIdError: ids missing, empty, not 1-D, not integers, negative, 2**63 or more, or
            repeated; the message says what to pass instead.
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
    if np.unique(a).size != a.size:
        uniq, counts = np.unique(a, return_counts=True)
        dup = uniq[counts > 1][:5].tolist()
        raise SampleIdError(f"duplicate sample ids in one batch: {dup}; each row needs its own id")
    t = torch.from_numpy(a)
    _CHECKED[id(t)] = t
    return t


def check_disjoint(seen: Tensor | None, ids: Tensor) -> None:
    """Raise if a micro-batch repeats ids already seen in the same optimizer step.

    Args:
        seen: ids of the step's earlier micro-batches (``[k]`` int64) or None.
        ids: the new micro-batch's checked ids.

    Raises:
        SampleIdError: some id appears in both.
    """
    if seen is None:
        return
    both = torch.cat([seen, ids])
    if both.unique().numel() != both.numel():
        dup = sorted(set(seen.tolist()) & set(ids.tolist()))[:5]
        raise SampleIdError(
            f"sample ids {dup} appear twice in one optimizer step (across micro-batches); "
            "each sample may appear once per step"
        )
