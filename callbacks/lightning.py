"""Lightning adapter: ``ShapleyCallback``, In-Run Shapley values with no change to the module."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.errors import ConfigurationError
from inrun_shapley.integration import (
    ShapleyConfig,
    TrackedValues,
    checkpoint_cursor,
    cursor_for_rank,
    gathered_cursor,
    merge_across_ranks,
    take_sample_ids,
)


class ShapleyCallback(TrackedValues, Callback):
    """Compute every training sample's In-Run Shapley value during ``Trainer.fit``.

    The LightningModule stays as it is, ``x, y = batch`` included. Sample ids: wrap the training
    dataset with :class:`inrun_shapley.IndexedDataset`; it adds each row's id to the item (a
    trailing element of tuple items, key ``"index"`` of dict items) and this callback takes the
    ids out of the batch IN PLACE in ``on_train_batch_start``, before ``training_step`` receives
    the very same batch object. Or pass ``ids_fn(batch)`` when your batches carry ids already.
    Works with gradient accumulation, gradient clipping, mixed precision (steps skipped by the
    scaler get no values), several parameter groups, LR schedulers, DDP (each rank scores its own
    samples; values are merged at the end of training) and ``fit(ckpt_path=...)`` (the
    checkpoint holds a small cursor: step counters and per-id totals; the log and the recording
    are continued).

    Args:
        val_data: the validation set: a ``Dataset``, one batch (tensor, tuple or dict of
            tensors), or a ``DataLoader`` (all its rows).
        val_loss_fn: ``fn(module, batch) -> [m]`` per-row losses. Default:
            :func:`inrun_shapley.integration.default_loss` (cross-entropy for integer targets, MSE
            otherwise, on ``module(input)``).
        ids_fn: ``fn(batch) -> sample ids`` (default: IndexedDataset's ids, else ``batch[ids_key]``).
        ids_key: dict key holding the ids (default ``"index"``).
        log_dir: also write the values to this value log (see ``inrun_shapley.log``).
        overwrite: replace a log (and recording) left in ``log_dir`` by an earlier run.
        resume: continue that log (and recording) without a checkpoint: steps continue after
            its last step. ``fit(ckpt_path=...)`` continues them in any case.
        **options: every :class:`inrun_shapley.ShapleyTracker` option (``estimator``, ``order``,
            ``per_query``, ``query_path``, ``val_sample_size``, ...), ``flush_every``, and
            ``record_trajectory=folder`` (with ``trajectory_every``) to also record the run for
            ``inrun_shapley.adjoint_influence``.

    Raises:
        ConfigurationError: unknown or invalid options (at construction), more than one optimizer.
        LogError: ``log_dir`` holds a log and neither ``overwrite`` nor ``resume`` is set.
        UnsupportedOptimizerError, UnsupportedModuleError: at the start of ``fit``.
        SampleIdError: at the first batch without ids.

    Example::

        trainer = Trainer(callbacks=[ShapleyCallback(val_data=val_set)])
        trainer.fit(module, DataLoader(IndexedDataset(train_set), batch_size=32))
        values = trainer.callbacks[0].values      # numpy, indexed by sample id
    """

    _training_call = "Trainer.fit"

    def __init__(self, val_data, val_loss_fn: Callable | None = None, *, ids_fn: Callable | None = None,
                 ids_key: str = "index", **options: Any):
        self.config = ShapleyConfig("ShapleyCallback", val_data=val_data, val_loss_fn=val_loss_fn,
                                    fixed=("ids_fn", "ids_key"), **options)
        self.ids_fn, self.ids_key = ids_fn, ids_key
        self.tracker = None
        self.attached = None
        self._restored: dict | None = None
        self._merged: InMemoryValues | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(estimator=self.config.estimator, order=self.config.order)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigurationError(
                f"ShapleyCallback supports one optimizer; configure_optimizers returned {len(trainer.optimizers)}"
            )
        self._deferred = bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))
        if not self._deferred:
            self._attach(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(self, "_deferred", False):  # FSDP strategies restore callback state after on_fit_start
            self._deferred = False
            self._attach(trainer, pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attached = self.config.build(
            pl_module, trainer.optimizers[0], world_size=trainer.world_size, rank=trainer.global_rank,
            restoring=self._restored is not None,
        )
        self.tracker = self.attached.tracker
        if self._restored is not None:
            self.tracker.load_state_dict(cursor_for_rank(self._restored, trainer.global_rank))
        self._merged = None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.tracker.begin_batch(take_sample_ids(batch, self.ids_fn, self.ids_key))

    @override
    def on_after_backward(self, trainer, pl_module) -> None:
        self.tracker.after_backward()

    @override
    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.tracker.new_accumulation_window()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.tracker.end_batch()

    @override
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.attached.flush()  # the log is never behind a checkpoint

    @override
    def state_dict(self) -> dict:
        """A cursor (step counters, per-id totals): its size does not grow with the steps."""
        # one process writes Lightning's checkpoint: it carries every rank's cursor
        return {} if self.tracker is None else gathered_cursor(checkpoint_cursor(self.tracker))

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._merged = merge_across_ranks(self.tracker.store)
        self.attached.flush()

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.attached is not None:
            self.attached.close()

    # ----------------------------------------------------------------- results
