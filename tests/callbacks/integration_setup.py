"""A small shared training setup for the framework-adapter tests (also run as DDP scripts)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley import IndexedDataset, ShapleyTracker

N_TRAIN, N_VAL, D, C = 32, 12, 6, 3


def data():
    g = torch.Generator().manual_seed(123)
    w = torch.randn(D, C, generator=g)
    x = torch.randn(N_TRAIN + N_VAL, D, generator=g)
    y = (x @ w + 0.3 * torch.randn(N_TRAIN + N_VAL, C, generator=g)).argmax(1)
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    val = (x[N_TRAIN:], y[N_TRAIN:])
    return train, val


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, C))


def make_optimizer(params, lr=1e-2):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def plain_values(batch_size=8, epochs=2, accumulate=1, clip=None, **tracker_options):
    """The reference: a plain PyTorch loop with ShapleyTracker, sequential batches."""
    train, val = data()
    model = make_model()
    opt = make_optimizer(model.parameters())
    tr = ShapleyTracker(
        model, opt, val_data=val,
        val_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), **tracker_options,
    )
    loader = DataLoader(IndexedDataset(train), batch_size=batch_size, shuffle=False)
    for _ in range(epochs):
        for i, (x, y, ids) in enumerate(loader):
            with tr.batch(ids):
                (F.cross_entropy(model(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
    tr.detach()
    return tr.values, tr.counts


def lightning_module_class():
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch  # the user's own unpacking: the callback removed the ids in place
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    return Classifier


def trainer_kwargs(**kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, max_epochs=2)
    base.update(kw)
    return base


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and float(np.abs(a - b).max()) <= rtol * float(np.abs(b).max())


def write_result(adapter, **extra) -> None:
    """Write a multi-process script's outcome to ``$RESULT_PATH`` as JSON: the adapter's merged
    ``values`` and ``counts`` (lists indexed by id) and any ``extra`` fields. Call from one process."""
    with open(os.environ["RESULT_PATH"], "w") as f:
        json.dump({"values": adapter.values.tolist(), "counts": adapter.counts.tolist(), **extra}, f)


def assert_equals_one_process(result, log_dir=None, *, last_step=None) -> None:
    """A multi-process run's outcome (:func:`write_result`) equals the one-process tracker on the
    same global batches of 8 (:func:`plain_values`); with ``log_dir``, so do its merged log's
    values; with ``last_step``, the log's counts too and its last step (a resumed run counts no
    step twice)."""
    from inrun_shapley.log import ShapleyLog

    ref, counts = plain_values(batch_size=8)
    assert close(result["values"], ref) and np.array_equal(result["counts"], counts)
    if log_dir is not None:
        log = ShapleyLog.load(log_dir)
        assert close(log.values, ref)
        if last_step is not None:
            assert np.array_equal(log.counts, counts) and log.last_step == last_step
