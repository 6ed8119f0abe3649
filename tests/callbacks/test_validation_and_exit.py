"""val_data given as a DataLoader; one default validation loss everywhere; a forgotten close()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley import IndexedDataset, ShapleyCallback, ShapleyLog
from tests.callbacks.integration_setup import close, data, lightning_module_class, plain_values, trainer_kwargs

ROOT = Path(__file__).resolve().parents[2]


def test_lightning_val_data_as_a_dataloader_equals_the_batch():
    pl = pytest.importorskip("lightning.pytorch")
    train, (xv, yv) = data()
    cb = ShapleyCallback(val_data=DataLoader(TensorDataset(xv, yv), batch_size=5, shuffle=True))
    pl.Trainer(callbacks=[cb], **trainer_kwargs()).fit(
        lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))
    assert close(cb.values, plain_values()[0])


def test_an_empty_validation_dataloader_says_so():
    from inrun_shapley import ConfigurationError

    with pytest.raises(ConfigurationError, match="yields no batches"):
        ShapleyCallback(val_data=DataLoader(TensorDataset(torch.zeros(0, 2))))


def test_forgotten_close_still_leaves_every_step_in_the_log(tmp_path):
    script = textwrap.dedent("""
        import torch.nn.functional as F
        from accelerate import Accelerator
        from torch.utils.data import DataLoader
        from inrun_shapley import IndexedDataset, ShapleyHook
        from tests.callbacks.integration_setup import data, make_model, make_optimizer

        train, val = data()
        accelerator = Accelerator(cpu=True)
        model = make_model()
        opt = make_optimizer(model.parameters())
        model, opt, loader = accelerator.prepare(model, opt, DataLoader(IndexedDataset(train), batch_size=8))
        hook = ShapleyHook(accelerator, model, opt, val_data=val, log_dir="log")
        for batch in loader:
            with hook.batch(batch):
                x, y = batch
                accelerator.backward(F.cross_entropy(model(x), y))
            opt.step(); opt.zero_grad()
        # no hook.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = ShapleyLog.load(tmp_path / "log")
    assert log.last_step == 4 and close(log.values, plain_values(epochs=1)[0])
    assert np.array_equal(log.counts, np.ones(len(data()[0])))


def test_a_forgotten_hook_whose_last_steps_cannot_be_written_warns(tmp_path, monkeypatch):
    import gc

    import torch.nn.functional as F
    from accelerate import Accelerator

    from inrun_shapley import ShapleyHook
    from tests.callbacks.integration_setup import make_model, make_optimizer

    train, val = data()
    accelerator = Accelerator(cpu=True)
    model = make_model()
    opt = make_optimizer(model.parameters())
    hook = ShapleyHook(accelerator, model, opt, val_data=val, log_dir=tmp_path / "log")
    x, y = train.tensors
    with hook.batch(torch.arange(8)):
        accelerator.backward(F.cross_entropy(model(x[:8]), y[:8]))
    opt.step()
    opt.zero_grad()

    def disk_full():
        raise OSError("No space left on device")

    monkeypatch.setattr(hook.attached.writer, "flush", disk_full)
    with pytest.warns(RuntimeWarning, match=r"ShapleyHook was not closed and its last 1 step\(s\) could not be written"):
        del hook
        gc.collect()
