"""What the framework adapters share, kept framework-free: their options (every
:class:`~inrun_shapley.engine.tracker.ShapleyTracker` option passes through), building the tracker
with its log and recording, sample ids taken out of a batch in place, the checkpoint cursor,
flushing at interpreter exit, and merging in-memory values across ranks.

The adapters in ``inrun_shapley.callbacks`` translate framework events into calls on these and
on :class:`~inrun_shapley.engine.tracker.ShapleyTracker`; nothing here imports Lightning or Accelerate.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.data import IDS_KEY, INPUT_KEYS, TARGET_KEYS, SampleIds, default_loss, validation_rows
from inrun_shapley.engine.ids import as_sample_ids
from inrun_shapley.engine.store import InMemoryValues, merge_across_ranks  # noqa: F401  (re-exported)
from inrun_shapley.engine.tracker import ShapleyTracker
from inrun_shapley.errors import ConfigurationError, LogError, SampleIdError

__all__ = [
    "ADAPTER_OPTIONS", "INPUT_KEYS", "TARGET_KEYS", "Attached", "BackwardEndSignal", "ShapleyConfig",
    "TrackedValues", "checkpoint_cursor", "cursor_for_rank", "default_loss", "gathered_cursor", "merge_across_ranks",
    "take_sample_ids", "tracker_options",
]

# Options of the adapters themselves (name -> default); every other option is a tracker option.
ADAPTER_OPTIONS: dict[str, Any] = {
    "log_dir": None, "flush_every": 50, "overwrite": False, "resume": False,
    "record_trajectory": None, "trajectory_every": 1,
}
# Tracker arguments the adapters set themselves.
_SET_BY_ADAPTER = {"self", "model", "optimizer", "val_data", "val_loss_fn", "validation", "world_size", "sink"}


def tracker_options() -> dict[str, Any]:
    """Name -> default of every :class:`ShapleyTracker` option an adapter passes through, read
    from the tracker's signature (a new tracker option passes through with no adapter change)."""
    params = inspect.signature(ShapleyTracker.__init__).parameters.values()
    return {
        p.name: p.default for p in params
        if p.name not in _SET_BY_ADAPTER and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check_option_names(owner: str, options: dict, fixed: tuple[str, ...]) -> None:
    valid = sorted({*tracker_options(), *ADAPTER_OPTIONS, *fixed})
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"{owner} got an unknown option {name!r}{hint}; valid options: {', '.join(valid)}"
            )


# The batch whose ids were taken last, and those ids: several adapters on one trainer (e.g. two
# callbacks with different estimators) all get the ids the first one took out. A strong reference,
# so the batch's ``id`` cannot be reused while it is kept (until the next batch replaces it).
_last_taken: tuple[Any, Any] | None = None


def take_sample_ids(batch, ids_fn: Callable | None = None, key: str = IDS_KEY) -> Tensor:
    """The sample ids of a batch, with the ids :class:`~inrun_shapley.IndexedDataset` added
    removed from the batch IN PLACE (trailing list element or dict key ``key``), so the code
    that receives the batch next sees the dataset's own structure.

    Order: ``ids_fn(batch)`` if given; else the :class:`~inrun_shapley.data.SampleIds` that
    IndexedDataset added; else ``batch[key]`` of a dict batch (your own ids: read, left in place).
    The added ids are removed in every case, also when ``ids_fn`` is given; a later call with
    the same batch object (a second adapter) gets them too.

    Returns:
        ``[n]`` int64 CPU tensor, checked as the tracker checks them (one function for both).

    Raises:
        SampleIdError: no ids can be found, they sit in a tuple batch (immutable: make the
            ``collate_fn`` return a list, as ``default_collate`` does, or pass ``ids_fn``), or
            they are not one distinct non-negative integer per row.
    """
    global _last_taken
    ids = ids_fn(batch) if ids_fn is not None else None
    added = None
    if isinstance(batch, dict) and isinstance(batch.get(key), SampleIds):
        added = batch.pop(key)
    elif isinstance(batch, list) and batch and isinstance(batch[-1], SampleIds):
        added = batch.pop()
    elif isinstance(batch, tuple) and batch and isinstance(batch[-1], SampleIds) and ids_fn is None:
        raise SampleIdError(
            "the batch is a tuple ending with IndexedDataset's sample ids, which cannot be removed "
            "in place before your code sees it: make the DataLoader's collate_fn return a list "
            "(default_collate does) or a dict, or pass ids_fn=lambda batch: batch[-1]"
        )
    if added is not None:
        _last_taken = (batch, added)
    elif _last_taken is not None and _last_taken[0] is batch:
        added = _last_taken[1]
    if ids is None:
        ids = added
    if ids is None and isinstance(batch, dict) and key in batch:
        ids = batch[key]
    if ids is None:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise SampleIdError(
            f"no sample ids in the batch (looked for IndexedDataset's ids and for key {key!r}; batch has "
            f"{found}). Wrap the training dataset with inrun_shapley.IndexedDataset, or pass "
            "ids_fn=lambda batch: <1-D tensor of sample ids>"
        )
    return as_sample_ids(ids)


def checkpoint_cursor(tracker: ShapleyTracker) -> dict:
    """The tracker's state for a training checkpoint, cut to a cursor: step counters and the
    per-id totals (O(number of ids), not O(steps)); the per-step records live in the log."""
    state = tracker.state_dict()
    return {**state, "values": {**state["values"], "records": []}}


def gathered_cursor(cursor: dict) -> dict:
    """Every rank's cursor on every rank (collective: every rank calls it), for checkpoints
    written by one process (Lightning's rank 0, Accelerate's main process, or one per node):
    ``{"by_rank": [cursor of rank 0, rank 1, ...]}``; ``cursor`` itself in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cursor
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, cursor)
    return {"by_rank": everyone}


def cursor_for_rank(state: dict, rank: int) -> dict:
    """This rank's cursor from a checkpoint's state (:func:`gathered_cursor`, or one cursor)."""
    return state["by_rank"][rank] if "by_rank" in state else state


class ShapleyConfig:
    """Everything an adapter needs to build a tracker, its log and its recording; checked when
    the adapter is constructed.

    Args:
        owner: the adapter's name, used in messages (``"ShapleyCallback"``, ``"ShapleyHook"``).
        val_data: validation set: a Dataset, one in-memory batch, or a ``DataLoader`` (its rows,
            as its ``collate_fn`` makes them, are the validation set).
        val_loss_fn: ``fn(model, batch) -> [m]`` per-row losses; None uses :func:`default_loss`.
        fixed: the adapter's own extra argument names (listed as valid in messages).
        **options: every :class:`ShapleyTracker` option (see :func:`tracker_options`), and
            ``log_dir`` (value log; per rank ``rank{r}`` under DDP, merged on load),
            ``flush_every`` (steps between log flushes), ``overwrite`` (replace an existing log
            and recording), ``resume`` (continue them: steps continue after the log's last
            step), ``record_trajectory`` (record the run for ``adjoint_influence`` into this
            folder; single process) and ``trajectory_every``.

    Raises:
        ConfigurationError: an unknown option (named, with the valid ones) or an invalid value.
    """

    def __init__(self, owner: str, *, val_data, val_loss_fn: Callable | None = None,
                 fixed: tuple[str, ...] = (), **options: Any):
        _check_option_names(owner, options, fixed)
        self.owner = owner
        if val_data is None:
            raise ConfigurationError("val_data is required: the validation set whose loss defines a sample's value")
        if val_loss_fn is not None and not callable(val_loss_fn):
            raise ConfigurationError("val_loss_fn must be callable as fn(model, batch) -> per-row losses")
        self.val_data = validation_rows(val_data)
        self.val_loss_fn = val_loss_fn or default_loss
        defaults = tracker_options()
        self.tracker_kwargs = {k: v for k, v in options.items() if k in defaults}
        self.estimator = self.tracker_kwargs.get("estimator", defaults.get("estimator"))
        self.order = self.tracker_kwargs.get("order", defaults.get("order"))
        adapter = {**ADAPTER_OPTIONS, **{k: v for k, v in options.items() if k in ADAPTER_OPTIONS}}
        self.log_dir, self.flush_every = adapter["log_dir"], adapter["flush_every"]
        self.overwrite, self.resume = bool(adapter["overwrite"]), bool(adapter["resume"])
        self.record_trajectory, self.trajectory_every = adapter["record_trajectory"], adapter["trajectory_every"]
        self.record_steps = self.tracker_kwargs.get("record_steps", defaults.get("record_steps", True))
        self.group_values = self.tracker_kwargs.get("group_values", False)
        from inrun_shapley.engine import tracker as engine

        if self.estimator not in getattr(engine, "ESTIMATORS", (self.estimator,)):
            raise ConfigurationError(f"estimator must be one of {engine.ESTIMATORS}, got {self.estimator!r}")
        if self.order not in (1, 2):
            raise ConfigurationError(f"order must be 1 or 2, got {self.order!r}")
        if isinstance(self.flush_every, bool) or not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ConfigurationError(f"flush_every must be an int >= 1, got {self.flush_every!r}")
        if self.overwrite and self.resume:
            raise ConfigurationError(
                f"{owner}: pass overwrite=True (start a new log) or resume=True (continue it), not both"
            )

    def log_path(self, rank: int, world_size: int) -> Path | None:
        if self.log_dir is None:
            return None
        root = Path(self.log_dir)
        return root / f"rank{rank}" if world_size > 1 else root

    def build(self, model: nn.Module, optimizer, *, world_size: int = 1, rank: int = 0,
              restoring: bool = False) -> "Attached":
        """A tracker attached to ``model``/``optimizer``, with its log writer and trajectory
        recorder. ``restoring``: the framework restores this adapter's checkpoint state next, so
        the log and the recording are continued whatever ``resume`` says."""
        from inrun_shapley.log import ShapleyLogWriter
        from inrun_shapley.trajectory import TrajectoryRecorder

        if self.record_trajectory is not None and world_size > 1:
            raise ConfigurationError("record_trajectory records a single-process run; it is not supported under DDP")
        tracker = ShapleyTracker(model, optimizer, val_data=self.val_data, val_loss_fn=self.val_loss_fn,
                                 world_size=world_size, **self.tracker_kwargs)
        resume = self.resume or restoring
        path = self.log_path(rank, world_size)
        writer = None
        if path is not None:
            self._refuse_unless_allowed(path, resume)
            writer = ShapleyLogWriter(
                path, group_names=tracker.group_names if self.group_values else None,
                record_steps=self.record_steps, flush_every=self.flush_every, resume=resume,
                overwrite=self.overwrite and not resume,
                metadata={"estimator": self.estimator, "order": self.order, "rank": rank, "world_size": world_size},
            )
            tracker.sink = writer
            if resume and writer.last_step > 0:
                _continue_from_log(tracker, writer)
        recorder = None
        if self.record_trajectory is not None:
            if resume:
                recorder = TrajectoryRecorder(self.record_trajectory, every=self.trajectory_every, resume=True)
            else:
                recorder = TrajectoryRecorder(self.record_trajectory, every=self.trajectory_every,
                                              overwrite=self.overwrite)
            tracker.add_step_listener(recorder)
        return Attached(tracker, writer, recorder)

    def _refuse_unless_allowed(self, path: Path, resume: bool) -> None:
        """Name the adapter's own options when ``path`` holds a log it may not touch (the
        writer replaces it with ``overwrite``)."""
        if resume or self.overwrite or not (path / "meta.json").exists():
            return
        raise LogError(
            f"{path} already holds a value log from an earlier run: pass {self.owner}(..., overwrite=True) "
            f"to replace it, {self.owner}(..., resume=True) to continue it, or another log_dir"
        )


def _continue_from_log(tracker: ShapleyTracker, writer) -> None:
    """Start the tracker where a resumed log ends: step counter and in-memory totals.

    The totals go over as they are kept, per seen id (``ids`` and rows aligned to them), so a
    log whose ids are hashes or global row numbers costs memory per seen id, never per
    ``max_id + 1``.
    """
    totals = writer.totals()
    tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    group_sum = totals.get("group_sum")
    tracker.load_state_dict({"step": writer.last_step, "values": {
        "ids": tensor(totals["ids"]), "sum": tensor(totals.get("value_sum", np.zeros(0))),
        "count": tensor(totals.get("count", np.zeros(0, np.int64))), "last_step": writer.last_step,
        "group_sum": tensor(group_sum), "group_names": writer.group_names if group_sum is not None else None,
    }})


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
        try:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.recorder is not None:
                self.recorder.close()
                self.recorder = None
        finally:
            self.tracker.detach()

    def close_when_collected(self, owner: object) -> weakref.finalize:
        """Close (so flush) when ``owner`` is garbage-collected or at interpreter exit, whichever
        comes first; warn if steps could not be written then. Calling the returned finalizer
        closes now (once)."""
        return weakref.finalize(owner, _close_quietly, self, type(owner).__name__)


def _close_quietly(attached: Attached, owner: str) -> None:
    pending = 0 if attached.writer is None else attached.writer.last_step - attached.writer.flushed_step
    path = None if attached.writer is None else attached.writer.path
    try:
        attached.close()
    except Exception as exc:  # at exit or in GC: warn, never raise
        warnings.warn(
            f"{owner} was not closed and its last {pending} step(s) could not be written to {path}: {exc}. "
            f"Call {owner}.close() (or use it as a context manager) at the end of training",
            RuntimeWarning, stacklevel=1,
        )


class TrackedValues:
    """Result accessors shared by the framework adapters.

    Adapters set ``tracker`` (None until training starts), ``_merged`` (the values merged across
    ranks at the end, or None) and ``_training_call`` (what the user calls to train, for the
    message when values are read too early).
    """

    tracker = None
    _merged: InMemoryValues | None = None
    _training_call = "training"

    def _store(self) -> InMemoryValues:
        if self._merged is not None:
            return self._merged
        if self.tracker is None:
            raise ConfigurationError(f"no values yet: the callback has not been used in {self._training_call}")
        return self.tracker.store

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


def _tensors(output) -> list[Tensor]:
    """Every tensor in a (nested) model output: tensor, mapping (``ModelOutput``), list or tuple."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


class BackwardEndSignal:
    """Call ``callback()`` at the end of the backward pass through each armed forward of
    ``model``, for frameworks that run forward, backward and clipping themselves
    (``transformers.Trainer``): every gradient is accumulated, a data-parallel all-reduce is
    done, gradient clipping has not happened yet.

    ``arm()`` (from a forward pre-hook) marks the next forward of ``model``; at its end a hook
    goes on each of its outputs that requires grad. The first one the backward reaches queues an
    autograd final callback, which queues ``callback``: final callbacks run in queue order after
    the backward, so ``callback`` runs after those queued during the backward (DDP finishes its
    all-reduce in one of them).
    """

    def __init__(self, model: nn.Module, callback: Callable[[], None]):
        self._callback = callback
        self._armed = False
        self._handle = model.register_forward_hook(self._after_forward)

    def arm(self) -> None:
        self._armed = True

    def remove(self) -> None:
        self._handle.remove()

    def _after_forward(self, module, args, output) -> None:
        if not self._armed:
            return
        self._armed = False
        queue = torch.autograd.Variable._execution_engine.queue_callback
        reached: list[bool] = []

        def on_grad(grad):
            if not reached:
                reached.append(True)
                queue(lambda: queue(self._callback))

        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(on_grad)
