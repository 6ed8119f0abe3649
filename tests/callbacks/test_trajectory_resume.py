"""Lightning record_trajectory across a crash and fit(ckpt_path=...): one recording of every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader

from inrun_shapley import IndexedDataset, Recording, ShapleyCallback, adjoint_influence
from tests.callbacks.integration_setup import data, lightning_module_class, trainer_kwargs

pl = pytest.importorskip("lightning.pytorch")


class Crash(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 6:
            raise RuntimeError("crash")  # the run dies after the checkpoint of step 4


def test_crash_and_resume_records_every_step_and_the_adjoint_accepts_it(tmp_path):
    train, val = data()
    loader = DataLoader(IndexedDataset(train), batch_size=8)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = ShapleyCallback(val_data=val, record_trajectory=tmp_path / "run")
    trainer = pl.Trainer(callbacks=[first, ckpt, Crash()], **trainer_kwargs(max_epochs=3, enable_checkpointing=True))
    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(lightning_module_class()(), loader)
    assert trainer.global_step == 6

    second = ShapleyCallback(val_data=val, record_trajectory=tmp_path / "run")
    trainer = pl.Trainer(callbacks=[second], **trainer_kwargs(max_epochs=3))
    trainer.fit(lightning_module_class()(), loader, ckpt_path=str(tmp_path / "last.ckpt"))

    rec = Recording.load(tmp_path / "run")
    assert rec.steps.tolist() == list(range(1, 13))
    assert sorted(rec.ids(5).tolist()) == list(range(8))
    x, y = train.tensors
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    scores = adjoint_influence(lightning_module_class()(), rec, (x, y), loss, val, lambda m, q: loss(m, q), progress=False)
    assert scores.shape == (len(train), len(val[0])) and np.isfinite(scores).all()
