"""What the framework adapters share, kept framework-free: the tracker's configuration, sample
ids from a batch, a default per-sample loss, and merging in-memory values across ranks.

The adapters in ``inrun_shapley.callbacks`` translate framework events into calls on these and
on :class:`~inrun_shapley.engine.tracker.ShapleyTracker`; nothing here imports Lightning or Accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.engine.tracker import ShapleyTracker

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "input_ids", "features")
TARGET_KEYS = ("target", "targets", "y", "label", "labels")


def _unpack(batch) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            raise ConfigurationError(
                f"the default validation loss looks for an input key {INPUT_KEYS} and a target key "
                f"{TARGET_KEYS} in dict batches; found {sorted(batch)}. Pass val_loss_fn=fn(model, batch) "
                "returning one loss per row"
            )
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigurationError(
        f"the default validation loss needs (input, target) batches or dicts with input/target keys, got "
        f"{type(batch).__name__}; pass val_loss_fn=fn(model, batch) returning one loss per row"
    )


def default_loss(model: nn.Module, batch) -> Tensor:
    """Per-row loss of a standard supervised model, used when no ``val_loss_fn`` is given.

    ``output = model(input)`` with ``(input, target)`` taken from a tuple/list batch or from the
    dict keys ``input``/``x``/``image``/``input_ids``... and ``target``/``y``/``label``...
    (``IndexedDataset`` batches work as they are). Integer targets: cross-entropy (class dimension
    1; for sequence outputs ``[B, T, C]`` with targets ``[B, T]`` the mean over positions).
    Floating targets: mean squared error averaged over all but the first dimension.

    Returns:
        ``[B]`` losses, one per row.
    """
    x, y = _unpack(batch)
    out = model(x)
    if not isinstance(out, Tensor):
        raise ConfigurationError(
            f"the default validation loss needs model(input) to return a tensor, got {type(out).__name__}; "
            "pass val_loss_fn=fn(model, batch)"
        )
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        if out.dim() == 3 and y.dim() == 2:
            return F.cross_entropy(out.transpose(1, 2), y.long(), reduction="none").mean(1)
        return F.cross_entropy(out, y.long(), reduction="none")
    return ((out - y.to(out.dtype)) ** 2).reshape(out.shape[0], -1).mean(1)


def sample_ids(batch, ids_fn: Callable | None = None, key: str = "index") -> Tensor:
    """The sample ids of a batch: ``ids_fn(batch)`` if given, else ``batch[key]`` for dict batches.

    Raises:
        SampleIdError: no ids can be found; the message says how to add them.
    """
    if ids_fn is not None:
        ids = ids_fn(batch)
    elif isinstance(batch, dict) and key in batch:
        ids = batch[key]
    else:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise SampleIdError(
            f"no sample ids in the batch (looked for key {key!r}; batch has {found}). Wrap the training "
            "dataset with inrun_shapley.IndexedDataset (its items carry 'index'), or pass "
            "ids_fn=lambda batch: <1-D tensor of sample ids>"
        )
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu()
    return ids


@dataclass
class ShapleyConfig:
    """Everything the adapters need to build a tracker and its log (see ShapleyTracker's args).

    Attributes:
        val_data: validation set (Dataset or one in-memory batch).
        val_loss_fn: ``fn(model, batch) -> per-row losses``; None uses :func:`default_loss`.
        log_dir: write values to this value log (per rank ``rank{r}`` under DDP, merged on load);
            None keeps them in memory only.
        flush_every: steps between log flushes.
        record_trajectory: also record the run for the adjoint pass
            (:class:`~inrun_shapley.trajectory.TrajectoryRecorder` in this folder; single process).
        trajectory_every: 1 stores every step; k > 1 stores checkpoints every k steps (replayed).
        Other fields: as in :class:`ShapleyTracker`.
    """

    val_data: Any = None
    val_loss_fn: Callable | None = None
    estimator: str = "shapley"
    order: int = 1
    val_sample_size: int | None = None
    val_batch_size: int = 256
    seed: int = 0
    group_values: bool = False
    record_steps: bool = True
    exclude: tuple = field(default_factory=tuple)
    strict: bool = True
    log_dir: str | os.PathLike | None = None
    flush_every: int = 50
    record_trajectory: str | os.PathLike | None = None
    trajectory_every: int = 1

    def __post_init__(self) -> None:
        if self.val_data is None:
            raise ConfigurationError("val_data is required: the validation set whose loss defines a sample's value")
        if self.val_loss_fn is not None and not callable(self.val_loss_fn):
            raise ConfigurationError("val_loss_fn must be callable as fn(model, batch) -> per-row losses")
        if self.estimator not in ("shapley", "loo", "sgd"):
            raise ConfigurationError(f"estimator must be 'shapley', 'loo' or 'sgd', got {self.estimator!r}")
        if self.order not in (1, 2):
            raise ConfigurationError(f"order must be 1 or 2, got {self.order!r}")
        if self.flush_every < 1:
            raise ConfigurationError(f"flush_every must be >= 1, got {self.flush_every}")
        self.exclude = tuple(self.exclude)

    def log_path(self, rank: int, world_size: int) -> Path | None:
        if self.log_dir is None:
            return None
        root = Path(self.log_dir)
        return root / f"rank{rank}" if world_size > 1 else root

    def build(self, model: nn.Module, optimizer, *, world_size: int = 1, rank: int = 0,
              resume: bool = False) -> "Attached":
        """A tracker attached to ``model``/``optimizer``, its log writer and trajectory recorder."""
        from inrun_shapley.log import ShapleyLogWriter
        from inrun_shapley.trajectory import TrajectoryRecorder

        if self.record_trajectory is not None and world_size > 1:
            raise ConfigurationError("record_trajectory records a single-process run; it is not supported under DDP")

        tracker = ShapleyTracker(
            model, optimizer, val_data=self.val_data, val_loss_fn=self.val_loss_fn or default_loss,
            estimator=self.estimator, order=self.order, val_sample_size=self.val_sample_size,
            val_batch_size=self.val_batch_size, seed=self.seed, group_values=self.group_values,
            record_steps=self.record_steps, exclude=self.exclude, strict=self.strict, world_size=world_size,
        )
        path = self.log_path(rank, world_size)
        writer = None
        if path is not None:
            writer = ShapleyLogWriter(
                path, group_names=tracker.group_names if self.group_values else None,
                record_steps=self.record_steps, flush_every=self.flush_every, resume=resume,
                metadata={"estimator": self.estimator, "order": self.order, "rank": rank, "world_size": world_size},
            )
            tracker.sink = writer
        recorder = None
        if self.record_trajectory is not None:
            recorder = TrajectoryRecorder(self.record_trajectory, every=self.trajectory_every, overwrite=resume)
            tracker.add_step_listener(recorder)
        return Attached(tracker, writer, recorder)


@dataclass
class Attached:
    """What :meth:`ShapleyConfig.build` attached: close it when training ends."""

    tracker: ShapleyTracker
    writer: Any = None
    recorder: Any = None

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.recorder is not None:
            self.recorder.flush()

    def close(self) -> None:
        """Flush and close the log and the recording, remove the tracker's hooks (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        self.tracker.detach()


def _as_numpy_state(state: dict) -> dict:
    tmp = InMemoryValues()
    tmp.load_state_dict(state)
    return {"sum": tmp._sum, "count": tmp._count, "last_step": tmp.last_step, "group_sum": tmp._group_sum,
            "group_names": tmp.group_names, "records": tmp.records}


def merge_across_ranks(store: InMemoryValues) -> InMemoryValues:
    """Every rank's in-memory totals summed (ranks score disjoint samples); identity without
    an initialized process group. Per-step records are concatenated in step order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return store
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, store.state_dict())
    parts = [_as_numpy_state(p) for p in parts]
    merged = InMemoryValues(record_steps=store.record_steps)
    size = max(len(p["sum"]) for p in parts)
    total = np.zeros(size)
    count = np.zeros(size, dtype=np.int64)
    groups = None
    for p in parts:
        total[: len(p["sum"])] += p["sum"]
        count[: len(p["count"])] += p["count"]
        if p.get("group_sum") is not None:
            if groups is None:
                groups = np.zeros((size, p["group_sum"].shape[1]))
            groups[: len(p["group_sum"])] += p["group_sum"]
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r[0])
    merged.load_state_dict({
        "sum": total, "count": count, "last_step": max(p["last_step"] for p in parts),
        "group_sum": groups, "group_names": parts[0].get("group_names"), "records": records,
    })
    return merged


class TrackedValues:
    """Result accessors shared by the framework adapters; subclasses implement ``_store()``."""

    def _store(self) -> InMemoryValues:
        raise NotImplementedError

    @property
    def values(self) -> np.ndarray:
        """``[max_id + 1]`` run values per sample id (all ranks merged after training)."""
        return self._store().values

    @property
    def counts(self) -> np.ndarray:
        """``[max_id + 1]`` number of optimizer steps each sample took part in."""
        return self._store().counts

    @property
    def group_values(self):
        """``[max_id + 1, G]`` values per tracked module (with ``group_values=True``), or None."""
        return self._store().group_values
