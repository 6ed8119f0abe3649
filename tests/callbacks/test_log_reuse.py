"""Running a script again with the same log_dir: overwrite= or resume=, named where they exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader

from inrun_shapley import ConfigurationError, IndexedDataset, LogError, ShapleyLog
from tests.callbacks.integration_setup import close, data, make_model, make_optimizer, plain_values


def accelerate_epochs(log_dir, epochs, state_dir=None, load=None, **options):
    """A user's Accelerate script; saves its state to ``state_dir``, or starts from ``load``."""
    from accelerate import Accelerator

    from inrun_shapley import ShapleyHook

    train, val = data()
    accelerator = Accelerator(cpu=True)
    model = make_model()
    opt = make_optimizer(model.parameters())
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(IndexedDataset(train), batch_size=8))
    hook = ShapleyHook(accelerator, model, opt, val_data=val, log_dir=log_dir, **options)
    accelerator.register_for_checkpointing(hook)
    if load is not None:
        accelerator.load_state(load)
    for _ in range(epochs):
        for batch in loader:
            with hook.batch(batch):
                x, y = batch
                accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    if state_dir is not None:
        accelerator.save_state(state_dir)
    hook.close()
    return hook


def test_a_second_run_on_the_same_log_names_overwrite_and_resume(tmp_path):
    accelerate_epochs(tmp_path / "log", 1)
    with pytest.raises(LogError, match=r"ShapleyHook\(\.\.\., overwrite=True\).*ShapleyHook\(\.\.\., resume=True\)"):
        accelerate_epochs(tmp_path / "log", 1)
    with pytest.raises(ConfigurationError, match="not both"):
        accelerate_epochs(tmp_path / "log", 1, overwrite=True, resume=True)


def test_overwrite_replaces_the_earlier_log(tmp_path):
    accelerate_epochs(tmp_path / "log", 2)
    accelerate_epochs(tmp_path / "log", 1, overwrite=True)
    log = ShapleyLog.load(tmp_path / "log")
    assert log.last_step == 4 and close(log.values, plain_values(epochs=1)[0])


def test_resume_from_accelerate_state_equals_an_uninterrupted_run(tmp_path):
    accelerate_epochs(tmp_path / "log", 1, state_dir=tmp_path / "state")
    hook = accelerate_epochs(tmp_path / "log", 1, load=tmp_path / "state", resume=True)
    ref, counts = plain_values(epochs=2)
    assert close(hook.values, ref) and np.array_equal(hook.counts, counts)
    log = ShapleyLog.load(tmp_path / "log")
    assert log.last_step == 8 and close(log.values, ref)


def test_resume_without_a_checkpoint_continues_the_step_count(tmp_path):
    accelerate_epochs(tmp_path / "log", 1)
    hook = accelerate_epochs(tmp_path / "log", 1, resume=True)
    assert hook.tracker.step == 8 and ShapleyLog.load(tmp_path / "log").last_step == 8
    assert np.array_equal(hook.counts, np.full(len(data()[0]), 2))
