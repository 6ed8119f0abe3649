"""Accelerate adapter: ``ShapleyHook``, In-Run Shapley values in an Accelerate training loop."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

from inrun_shapley.integration import ShapleyConfig, TrackedValues, merge_across_ranks, sample_ids
from inrun_shapley.engine.store import InMemoryValues


class ShapleyHook(TrackedValues):
    """Attach In-Run Shapley tracking to prepared Accelerate objects.

    The loop changes by one line per batch: wrap the forward and ``accelerator.backward`` in
    ``with hook.batch(ids):``, and clip/step after it. ``accelerator.accumulate`` (values per real
    optimizer step), ``accelerator.clip_grad_norm_``, mixed precision (steps the scaler skips get
    no values) and multi-process data parallelism (each process scores its own samples) are all
    accounted for. Call :meth:`close` (or use the hook as a context manager) at the end.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (wrapped or not; hooks go on the unwrapped module).
        optimizer: the prepared optimizer (``AcceleratedOptimizer``) or the torch one.
        val_data: validation set (Dataset or one batch of tensors).
        val_loss_fn: ``fn(model, batch) -> per-row losses`` (default: cross-entropy / MSE, see
            :func:`inrun_shapley.integration.default_loss`).
        log_dir: also write values to this value log (per process ``rank{r}``, merged on load).
        **options: as in :class:`inrun_shapley.ShapleyTracker` (``estimator``, ``order``, ...);
            ``record_trajectory=folder`` also records the run for the adjoint pass.

    Example::

        hook = ShapleyHook(accelerator, model, optimizer, val_data=val_batch)
        for batch in loader:
            with accelerator.accumulate(model):
                with hook.batch(batch["index"]):
                    accelerator.backward(loss_fn(model(batch["input"]), batch["target"]))
                optimizer.step(); optimizer.zero_grad()
        hook.close(); print(hook.values)
    """

    def __init__(self, accelerator, model, optimizer, *, val_data, val_loss_fn: Callable | None = None,
                 log_dir=None, **options: Any):
        self.config = ShapleyConfig(val_data=val_data, val_loss_fn=val_loss_fn, log_dir=log_dir, **options)
        self.accelerator = accelerator
        self.attached = self.config.build(
            accelerator.unwrap_model(model), optimizer,
            world_size=accelerator.num_processes, rank=accelerator.process_index,
        )
        self.tracker = self.attached.tracker
        self._merged: InMemoryValues | None = None

    @contextmanager
    def batch(self, ids=None, *, batch=None, ids_fn: Callable | None = None):
        """Wrap one micro-batch's forward and backward. ``ids``: one sample id per row (or pass
        ``batch=`` to read ``batch["index"]``/``ids_fn(batch)``)."""
        if ids is None:
            ids = sample_ids(batch, ids_fn)
        with self.tracker.batch(ids):
            yield self

    def close(self) -> None:
        """Merge values across processes, flush the log, remove the hooks."""
        if self._merged is not None:
            return
        self._merged = merge_across_ranks(self.tracker.store)
        self.attached.close()

    def __enter__(self) -> "ShapleyHook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        """For ``accelerator.register_for_checkpointing(hook)``: the step cursor and values."""
        self.attached.flush()
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)

    def _store(self) -> InMemoryValues:
        return self._merged if self._merged is not None else self.tracker.store
