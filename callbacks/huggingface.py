"""Hugging Face adapter: ``ShapleyTrainerCallback``, In-Run Shapley values in ``transformers.Trainer``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from inrun_shapley.atomic import atomic_write
from inrun_shapley.data import IDS_KEY
from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.integration import (
    BackwardEndSignal,
    ShapleyConfig,
    TrackedValues,
    checkpoint_cursor,
    merge_across_ranks,
)

CURSOR_FOLDER = "inrun_shapley"  # inside each checkpoint-N folder: one cursor per rank


def causal_lm_loss(model: nn.Module, batch: dict, *, per_token: bool = False) -> Tensor:
    """Next-token cross-entropy of a causal language model (``model(**inputs).logits``, ``[m, T, V]``).

    Targets are ``batch["labels"]`` (positions set to -100 are ignored), else ``input_ids``
    (positions where ``attention_mask`` is 0 are ignored), shifted by one as Hugging Face's
    causal LMs do. Lower is better.

    Returns:
        ``[m]`` mean loss per row over its scored tokens, or with ``per_token=True`` ``[m, T - 1]``
        per-token losses (0 at ignored positions), for ``per_query=True``: each token a query.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    logits = model(**inputs).logits[:, :-1]
    labels = labels[:, 1:]
    scored = labels != -100
    losses = F.cross_entropy(logits.transpose(1, 2).float(), labels.masked_fill(~scored, 0), reduction="none")
    losses = losses * scored
    return losses if per_token else losses.sum(1) / scored.sum(1).clamp(min=1)


class ShapleyTrainerCallback(TrackedValues, TrainerCallback):
    """Compute every training sample's In-Run Shapley value during ``Trainer.train``.

    The model, the ``TrainingArguments`` and the collator stay as they are. Sample ids: wrap the
    training dataset (a ``datasets.Dataset`` or a torch dataset of dict items) with
    :class:`inrun_shapley.IndexedDataset`; each item gets its row number under ``"index"``, the
    callback keeps that column through ``remove_unused_columns``, and a forward pre-hook on the
    model takes it out of the model's keyword arguments before its forward. Gradient
    accumulation, ``max_grad_norm`` clipping (the gradient norm is read at the end of each
    backward, after the data-parallel all-reduce and before clipping), bf16/fp16 (steps the scaler
    skips get no values), ``save_steps`` checkpoints with ``resume_from_checkpoint`` (each
    checkpoint holds a cursor per process in ``checkpoint-N/inrun_shapley/``: step counters and
    per-id totals; the log is continued) and multi-process runs (each process scores its own
    samples; values are merged when training ends) are accounted for.

    Args:
        val_data: the validation set: one dict batch of tensors (``input_ids``, ``attention_mask``,
            ``labels``...), a Dataset of such dict items, or a ``DataLoader``.
        val_loss_fn: ``fn(model, batch) -> [m]`` per-row losses (``[m, T]`` per-token losses with
            ``per_query=True``). Default: :func:`causal_lm_loss`
            (next-token cross-entropy); pass your own for other heads.
        ids_key: the column holding the sample ids (default IndexedDataset's ``"index"``).
        checkpoint: the checkpoint folder a resumed run starts from, when it is not
            ``output_dir/checkpoint-{step}`` (what ``resume_from_checkpoint=True`` picks).
        **options: every :class:`inrun_shapley.ShapleyTracker` option (``estimator``, ``order``,
            ``per_query``, ``exclude``, ...), ``log_dir`` (per process ``rank{r}``, merged on
            load), ``flush_every``, ``overwrite`` / ``resume``, ``record_trajectory``.

    Raises:
        ConfigurationError: unknown or invalid options; a resumed run whose checkpoint has no cursor.
        LogError: ``log_dir`` holds a log and neither ``overwrite`` nor ``resume`` is set.
        SampleIdError: an optimizer step saw no batch with sample ids (dataset not wrapped).

    Example::

        trainer = Trainer(model, args, train_dataset=IndexedDataset(train_set),
                          callbacks=[ShapleyTrainerCallback(val_data=val_batch)])
        trainer.train()
        values = trainer.callback_handler.callbacks[-1].values   # or keep a reference
    """

    _training_call = "Trainer.train"

    def __init__(self, val_data, val_loss_fn: Callable | None = None, *, ids_key: str = IDS_KEY,
                 checkpoint: str | Path | None = None, **options: Any):
        self.config = ShapleyConfig("ShapleyTrainerCallback", val_data=val_data,
                                    val_loss_fn=val_loss_fn or causal_lm_loss,
                                    fixed=("ids_key", "checkpoint"), **options)
        self.ids_key, self.checkpoint = ids_key, checkpoint
        self.tracker = None
        self.attached = None
        self._signal: BackwardEndSignal | None = None
        self._pre_hook = None
        self._batches = 0  # micro-batches with ids since the last optimizer step
        self._close_later = None
        self._merged: InMemoryValues | None = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._detach()
        restoring = state.global_step > 0
        self.attached = self.config.build(model, optimizer, world_size=args.world_size, rank=args.process_index,
                                          restoring=restoring)
        self.tracker = self.attached.tracker
        if restoring:
            self.tracker.load_state_dict(self._load_cursor(args, state.global_step))
        keep_column(train_dataloader, self.ids_key)
        self._signal = BackwardEndSignal(model, self._end_of_backward)
        self._pre_hook = model.register_forward_pre_hook(self._take_ids, with_kwargs=True)
        self._close_later = self.attached.close_when_collected(self)
        self._merged = None
        self._batches = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._batches == 0:
            raise SampleIdError(
                f"step {state.global_step + 1}: no training batch carried sample ids (column {self.ids_key!r}): "
                "wrap the training dataset, Trainer(train_dataset=inrun_shapley.IndexedDataset(train_set)), "
                "or pass ids_key=<your id column>"
            )
        self._batches = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.tracker.new_accumulation_window()  # gradients were zeroed: a skipped step's batches go

    def on_save(self, args, state, control, **kwargs):
        """Flush the log (never behind a checkpoint) and save this process's cursor with it."""
        self.attached.flush()
        buffer = io.BytesIO()
        torch.save(checkpoint_cursor(self.tracker), buffer)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CURSOR_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"rank{args.process_index}.pt", buffer.getvalue())

    def on_train_end(self, args, state, control, **kwargs):
        self._merged = merge_across_ranks(self.tracker.store)
        self._detach()

    # ----------------------------------------------------------------- batches
    def _take_ids(self, module, args, kwargs):
        """Forward pre-hook: the ids leave the model's keyword arguments; a training forward
        opens a micro-batch (the tracker's own validation passes carry no ids)."""
        if self.ids_key not in kwargs:
            return None
        kwargs = dict(kwargs)
        ids = kwargs.pop(self.ids_key)
        if module.training and torch.is_grad_enabled():
            self.tracker.begin_batch(ids)
            self._signal.arm()
            self._batches += 1
        return args, kwargs

    def _end_of_backward(self) -> None:
        self.tracker.after_backward()
        self.tracker.end_batch()

    def _load_cursor(self, args, step: int) -> dict:
        root = Path(self.checkpoint) if self.checkpoint is not None else Path(args.output_dir) / f"checkpoint-{step}"
        path = root / CURSOR_FOLDER / f"rank{args.process_index}.pt"
        if not path.exists():
            raise ConfigurationError(
                f"the Trainer resumes at step {step} but {path} holds no ShapleyTrainerCallback cursor: resume "
                "from a checkpoint saved with this callback, or pass ShapleyTrainerCallback(..., "
                "checkpoint=<the checkpoint folder>) when it is not output_dir/checkpoint-<step>"
            )
        cursor = torch.load(path, weights_only=True)
        if int(cursor["step"]) != step:
            raise ConfigurationError(
                f"{path} is the cursor of step {cursor['step']}, the Trainer resumes at step {step}")
        return cursor

    def _detach(self) -> None:
        for handle in (self._pre_hook, self._signal):
            if handle is not None:
                handle.remove()
        self._pre_hook = self._signal = None
        if self.attached is not None:
            self.attached.close()



def keep_column(loader, key: str) -> None:
    """Keep ``key`` through the Trainer's ``remove_unused_columns``: for datasets other than
    ``datasets.Dataset`` the Trainer drops the columns the model's forward does not take in the
    collator (``RemoveColumnsCollator``, which keeps its ``signature_columns``); the key is added
    to them (a new list: the Trainer's own list, used for evaluation, is left as it is)."""
    collate = getattr(loader, "collate_fn", None)
    columns = getattr(collate, "signature_columns", None)
    if isinstance(columns, list) and key not in columns:
        collate.signature_columns = [*columns, key]
