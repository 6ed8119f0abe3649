"""Checkpoints hold a cursor, not the run's records; resuming equals an uninterrupted run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from inrun_shapley import IndexedDataset, ShapleyCallback, ShapleyLog
from tests.callbacks.integration_setup import close, data, lightning_module_class, plain_values, trainer_kwargs

pl = pytest.importorskip("lightning.pytorch")


def callback_state_bytes(tmp_path, max_steps: int) -> int:
    train, val = data()
    cb = ShapleyCallback(val_data=val, log_dir=tmp_path / f"log{max_steps}")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / f"ckpt{max_steps}", save_last=True)
    trainer = pl.Trainer(callbacks=[cb, ckpt], **trainer_kwargs(max_epochs=-1, max_steps=max_steps,
                                                                enable_checkpointing=True))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))
    state = torch.load(tmp_path / f"ckpt{max_steps}" / "last.ckpt", weights_only=True)["callbacks"][cb.state_key]
    assert state["step"] == max_steps
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())


def test_callback_state_does_not_grow_with_the_steps(tmp_path):
    small, large = callback_state_bytes(tmp_path, 5), callback_state_bytes(tmp_path, 50)
    assert large <= small + 64, (small, large)


def test_resume_with_the_cursor_equals_an_uninterrupted_run(tmp_path):
    train, val = data()
    first = ShapleyCallback(val_data=val, log_dir=tmp_path / "log")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(callbacks=[first, ckpt], **trainer_kwargs(max_epochs=1, enable_checkpointing=True))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))
    second = ShapleyCallback(val_data=val, log_dir=tmp_path / "log")
    trainer = pl.Trainer(callbacks=[second], **trainer_kwargs(max_epochs=3))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8),
                ckpt_path=str(tmp_path / "last.ckpt"))
    ref, counts = plain_values(epochs=3)
    assert close(second.values, ref) and np.array_equal(second.counts, counts)
    log = ShapleyLog.load(tmp_path / "log")
    assert close(log.values, ref) and log.last_step == 12
