"""Accelerate's last, shorter accumulation window of an epoch: the values follow the step taken.

32 rows in batches of 8 with ``gradient_accumulation_steps=3`` give windows of 3 and 1 batches.
Accelerate ends the window at the end of the dataloader and divides every loss by 3, also in the
1-batch window, so that step's gradient is a third of its batch's mean-loss gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader

from inrun_shapley import IndexedDataset, ShapleyTracker
from tests.callbacks.integration_setup import close, data, make_model, make_optimizer

STEPS = 3


def accelerate_run():
    from accelerate import Accelerator

    from inrun_shapley import ShapleyHook

    train, val = data()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=STEPS)
    model = make_model()
    opt = make_optimizer(model.parameters())
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(IndexedDataset(train), batch_size=8))
    with ShapleyHook(accelerator, model, opt, val_data=val) as hook:
        for _ in range(2):
            for batch in loader:
                with accelerator.accumulate(model):
                    with hook.batch(batch):
                        x, y = batch
                        accelerator.backward(F.cross_entropy(model(x), y))
                    opt.step()
                    opt.zero_grad()
    return hook


def plain_run(divide_by_window_length: bool):
    train, val = data()
    model = make_model()
    opt = make_optimizer(model.parameters())
    tracker = ShapleyTracker(model, opt, val_data=val)
    batches = list(DataLoader(IndexedDataset(train), batch_size=8))
    windows = [batches[i:i + STEPS] for i in range(0, len(batches), STEPS)]
    for _ in range(2):
        for window in windows:
            for x, y, ids in window:
                with tracker.batch(ids):
                    scale = len(window) if divide_by_window_length else STEPS
                    (F.cross_entropy(model(x), y) / scale).backward()
            opt.step()
            opt.zero_grad()
    tracker.detach()
    return tracker


def test_last_short_window_values_are_those_of_accelerates_scaled_step():
    pytest.importorskip("accelerate")
    hook = accelerate_run()
    as_accelerate = plain_run(divide_by_window_length=False)
    as_one_batch = plain_run(divide_by_window_length=True)
    assert hook.tracker.step == as_accelerate.step == 4
    assert close(hook.values, as_accelerate.values) and np.array_equal(hook.counts, as_accelerate.counts)
    assert not close(hook.values, as_one_batch.values, rtol=1e-2)  # a different run from step 2 on
