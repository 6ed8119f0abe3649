"""Accelerate adapter: ``ShapleyHook``, In-Run Shapley values in an Accelerate training loop."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

from torch import Tensor

from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.integration import (
    ShapleyConfig,
    TrackedValues,
    checkpoint_cursor,
    cursor_for_rank,
    gathered_cursor,
    merge_across_ranks,
    take_sample_ids,
)


def _is_batch(obj) -> bool:
    """A whole batch (dict, or list/tuple holding tensors) rather than the ids themselves."""
    return isinstance(obj, dict) or (isinstance(obj, (list, tuple)) and any(isinstance(v, Tensor) for v in obj))


class ShapleyHook(TrackedValues):
    """Attach In-Run Shapley tracking to prepared Accelerate objects.

    The loop changes by one line per batch: wrap the forward and ``accelerator.backward`` in
    ``with hook.batch(batch):``, and clip/step after it. Given the whole batch of an
    :class:`inrun_shapley.IndexedDataset`, ``hook.batch`` takes the ids out of it IN PLACE, so
    ``x, y = batch`` inside the block sees your dataset's own structure; ``hook.batch(ids)`` with
    the ids themselves works too. ``accelerator.accumulate`` (values per real optimizer step),
    ``accelerator.clip_grad_norm_``, mixed precision (steps the scaler skips get no values) and
    multi-process data parallelism (each process scores its own samples) are accounted for.

    Gradient accumulation at the end of an epoch: Accelerate ends the accumulation window at the
    end of the dataloader, so with ``n_batches % gradient_accumulation_steps = r != 0`` the last
    optimizer step of an epoch has ``r`` micro-batches, and ``accelerator.backward`` still divides
    each loss by ``gradient_accumulation_steps``: that step's gradient is ``r / steps`` times the
    mean-loss gradient of its rows. The values describe the step Accelerate really takes (which
    differs from one batch of the same rows, e.g. under Adam, and the runs differ from there).

    Call :meth:`close` (or use the hook as a context manager) at the end: it merges the values
    across processes. If you forget it, the log is still flushed when the hook is garbage
    collected or the interpreter exits (a warning says if that write fails).

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (wrapped or not; hooks go on the unwrapped module).
        optimizer: the prepared optimizer (``AcceleratedOptimizer``) or the torch one.
        val_data: validation set (Dataset, one batch of tensors, or a DataLoader).
        val_loss_fn: ``fn(model, batch) -> [m]`` per-row losses (default:
            :func:`inrun_shapley.integration.default_loss`, cross-entropy / MSE).
        **options: every :class:`inrun_shapley.ShapleyTracker` option (``estimator``, ``order``,
            ``per_query``, ...); ``log_dir`` (per process ``rank{r}``, merged on load),
            ``flush_every``, ``overwrite`` / ``resume`` (an existing log: replace / continue it;
            with ``accelerator.register_for_checkpointing(hook)`` and ``load_state`` use
            ``resume=True``), ``record_trajectory=folder`` to record the run for the adjoint pass.

    Raises:
        ConfigurationError: unknown or invalid options.
        LogError: ``log_dir`` holds a log and neither ``overwrite`` nor ``resume`` is set.

    Example::

        hook = ShapleyHook(accelerator, model, optimizer, val_data=val_batch)
        for batch in loader:                       # DataLoader(IndexedDataset(train_set))
            with accelerator.accumulate(model):
                with hook.batch(batch):            # removes the ids from the batch
                    x, y = batch
                    accelerator.backward(loss_fn(model(x), y))
                optimizer.step(); optimizer.zero_grad()
        hook.close(); print(hook.values)
    """

    def __init__(self, accelerator, model, optimizer, *, val_data, val_loss_fn: Callable | None = None,
                 **options: Any):
        self.config = ShapleyConfig("ShapleyHook", val_data=val_data, val_loss_fn=val_loss_fn, **options)
        self.accelerator = accelerator
        self.attached = self.config.build(
            accelerator.unwrap_model(model), optimizer,
            world_size=accelerator.num_processes, rank=accelerator.process_index,
        )
        self.tracker = self.attached.tracker
        self._merged: InMemoryValues | None = None
        self._close_later = self.attached.close_when_collected(self)

    @contextmanager
    def batch(self, ids=None, *, batch=None, ids_fn: Callable | None = None, ids_key: str = "index"):
        """Wrap one micro-batch's forward and backward.

        Args:
            ids: the batch itself (IndexedDataset's ids are taken out of it in place) or one
                sample id per row (tensor, array or list of ints).
            batch: the batch, by keyword (same as passing it as ``ids``).
            ids_fn: ``fn(batch) -> ids`` for batches that carry ids of their own.
            ids_key: dict key of the ids when reading them from a dict batch.
        """
        source = batch if batch is not None else ids
        if ids_fn is not None or _is_batch(source):
            source = take_sample_ids(source, ids_fn, ids_key)
        with self.tracker.batch(source):
            yield self

    def close(self) -> None:
        """Merge values across processes, flush the log, remove the hooks (idempotent)."""
        if self._merged is not None:
            return
        self._merged = merge_across_ranks(self.tracker.store)
        self._close_later()

    def __enter__(self) -> "ShapleyHook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        """For ``accelerator.register_for_checkpointing(hook)``: a cursor (step counters and
        per-id totals; its size does not grow with the steps). Flushes the log first."""
        self.attached.flush()
        return gathered_cursor(checkpoint_cursor(self.tracker))  # the main process alone writes it

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(cursor_for_rank(state, self.accelerator.process_index))

