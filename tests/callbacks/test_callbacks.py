"""Lightning ShapleyCallback and Accelerate ShapleyHook give the plain tracker's values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from inrun_shapley import IndexedDataset, SampleIdError, UnsupportedOptimizerError
from inrun_shapley.callbacks import ShapleyCallback, ShapleyHook
from tests.callbacks.integration_setup import (
    assert_equals_one_process,
    close,
    data,
    lightning_module_class,
    make_model,
    make_optimizer,
    plain_values,
    trainer_kwargs,
)

pl = pytest.importorskip("lightning.pytorch")
ROOT = Path(__file__).resolve().parents[2]


def fit(callback, batch_size=8, **kw):
    train, _ = data()
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(**kw))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=batch_size))
    return trainer


def test_lightning_equals_plain_tracker():
    _, val = data()
    cb = ShapleyCallback(val_data=val)
    fit(cb)
    ref, counts = plain_values()
    assert close(cb.values, ref) and np.array_equal(cb.counts, counts)


def test_lightning_gradient_accumulation_2x4_equals_batch_8():
    _, val = data()
    cb = ShapleyCallback(val_data=val)
    fit(cb, batch_size=4, accumulate_grad_batches=2)
    ref, _ = plain_values(batch_size=8)
    assert close(cb.values, ref)


def test_lightning_gradient_clipping_is_accounted_for():
    _, val = data()
    cb = ShapleyCallback(val_data=val)
    fit(cb, gradient_clip_val=0.05)
    ref, _ = plain_values(clip=0.05)
    unclipped, _ = plain_values()
    assert close(cb.values, ref) and not close(cb.values, unclipped, rtol=1e-2)


def test_lightning_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    _, val = data()
    first = ShapleyCallback(val_data=val, log_dir=tmp_path / "log")
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    train, _ = data()
    trainer = pl.Trainer(callbacks=[first, ckpt_cb], **trainer_kwargs(max_epochs=1, enable_checkpointing=True))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))
    second = ShapleyCallback(val_data=val, log_dir=tmp_path / "log")
    trainer = pl.Trainer(callbacks=[second], **trainer_kwargs(max_epochs=2))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8),
                ckpt_path=str(tmp_path / "last.ckpt"))
    ref, counts = plain_values(epochs=2)
    assert close(second.values, ref) and np.array_equal(second.counts, counts)
    from inrun_shapley.log import ShapleyLog

    log = ShapleyLog.load(tmp_path / "log")
    assert close(log.values, ref) and log.last_step == 8


def test_lightning_bad_inputs_fail_before_the_first_step():
    train, val = data()
    trainer = pl.Trainer(callbacks=[ShapleyCallback(val_data=val)], **trainer_kwargs(max_steps=1))
    module = lightning_module_class()()
    module.training_step = lambda batch, i: F.cross_entropy(module(batch[0]), batch[1])
    with pytest.raises(SampleIdError, match="Wrap the training dataset with inrun_shapley.IndexedDataset"):
        trainer.fit(module, DataLoader(train, batch_size=8))

    module = lightning_module_class()()
    module.configure_optimizers = lambda: torch.optim.RMSprop(module.parameters())
    trainer = pl.Trainer(callbacks=[ShapleyCallback(val_data=val)], **trainer_kwargs(max_steps=1))
    with pytest.raises(UnsupportedOptimizerError, match="RMSprop"):
        trainer.fit(module, DataLoader(IndexedDataset(train), batch_size=8))

    trainer = pl.Trainer(callbacks=[ShapleyCallback(val_data=val, ids_fn=lambda b: b[-1] - 100)],
                         **trainer_kwargs(max_steps=1))
    with pytest.raises(SampleIdError, match="non-negative"):
        trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))

    trainer = pl.Trainer(callbacks=[ShapleyCallback(val_data=val, ids_fn=lambda b: b[-1][:3])],
                         **trainer_kwargs(max_steps=1))
    with pytest.raises(SampleIdError, match="first dimension 8, but the batch has 3 sample ids"):
        trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))


def test_lightning_bf16_mixed_runs_and_stays_close():
    _, val = data()
    cb = ShapleyCallback(val_data=val)
    fit(cb, precision="bf16-mixed")
    ref, _ = plain_values()
    assert np.isfinite(cb.values).all()
    assert np.corrcoef(cb.values, ref)[0, 1] > 0.95


def accelerate_values(accumulate=1, batch_size=8, clip=None, mixed="no"):
    from accelerate import Accelerator

    train, val = data()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate, mixed_precision=mixed)
    model = make_model()
    opt = make_optimizer(model.parameters())
    loader = DataLoader(IndexedDataset(train), batch_size=batch_size)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = ShapleyHook(accelerator, model, opt, val_data=val)
    for _ in range(2):
        for batch in loader:
            with accelerator.accumulate(model):
                with hook.batch(batch):
                    x, y = batch
                    accelerator.backward(F.cross_entropy(model(x), y))
                if clip is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
    hook.close()
    return hook.values, hook.counts


def test_accelerate_equals_plain_tracker():
    values, counts = accelerate_values()
    ref, ref_counts = plain_values()
    assert close(values, ref) and np.array_equal(counts, ref_counts)


def test_accelerate_accumulation_and_clipping():
    values, _ = accelerate_values(accumulate=2, batch_size=4, clip=0.05)
    ref, _ = plain_values(batch_size=8, clip=0.05)
    assert close(values, ref)


def _run_distributed(script: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RESULT_PATH": str(out)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed" / script)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_lightning_ddp_two_processes_equals_one(tmp_path):
    result = _run_distributed("lightning_ddp.py", tmp_path)
    assert_equals_one_process(result, tmp_path / "log")


@pytest.mark.distributed
def test_accelerate_two_processes_equals_one(tmp_path):
    result = _run_distributed("accelerate_ddp.py", tmp_path)
    assert_equals_one_process(result)


def test_lightning_records_the_trajectory_for_the_adjoint_pass(tmp_path):
    from inrun_shapley import Recording

    _, val = data()
    cb = ShapleyCallback(val_data=val, record_trajectory=tmp_path / "run")
    fit(cb, max_epochs=1)
    rec = Recording.load(tmp_path / "run")
    assert (rec.first_step, rec.last_step) == (1, 4)
    assert sorted(rec.ids(1).tolist()) == list(range(8))
