"""Adapter options: every ShapleyTracker option passes through, unknown ones are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader

from inrun_shapley import ConfigurationError, IndexedDataset, ShapleyTracker
from inrun_shapley.integration import tracker_options
from tests.callbacks.integration_setup import close, data, lightning_module_class, make_model, make_optimizer, trainer_kwargs

pl = pytest.importorskip("lightning.pytorch")


def test_both_adapters_import_from_the_top_level():
    import inrun_shapley
    from inrun_shapley import ShapleyCallback, ShapleyHook
    from inrun_shapley.callbacks import ShapleyCallback as Callback, ShapleyHook as Hook

    assert ShapleyCallback is Callback and ShapleyHook is Hook
    assert {"ShapleyCallback", "ShapleyHook"} <= set(dir(inrun_shapley)) | set(inrun_shapley.__all__)


def test_every_tracker_option_is_accepted_by_both_adapters():
    from accelerate import Accelerator

    from inrun_shapley import ShapleyCallback, ShapleyHook

    _, val = data()
    options = tracker_options()
    assert {"per_query", "query_path", "estimator", "order", "val_sample_size", "exclude"} <= set(options)
    for name, default in options.items():
        ShapleyCallback(val_data=val, **{name: default})
    model = make_model()
    hook = ShapleyHook(Accelerator(cpu=True), model, make_optimizer(model.parameters()), val_data=val,
                       per_query=True, query_path="exact")
    assert hook.tracker.per_query and hook.tracker.query_path == "exact"
    hook.close()


@pytest.mark.parametrize("adapter", ["ShapleyCallback", "ShapleyHook"])
def test_an_unknown_option_is_named_with_a_suggestion(adapter):
    import inrun_shapley

    _, val = data()
    cls = getattr(inrun_shapley, adapter)
    args = () if adapter == "ShapleyCallback" else (None, None, None)
    with pytest.raises(ConfigurationError, match=r"unknown option 'per_qeury' \(did you mean 'per_query'\?\).*query_path"):
        cls(*args, val_data=val, per_qeury=True)


def test_lightning_per_query_values_equal_the_plain_tracker():
    from inrun_shapley import ShapleyCallback

    train, val = data()
    cb = ShapleyCallback(val_data=val, per_query=True, query_path="exact")
    trainer = pl.Trainer(callbacks=[cb], **trainer_kwargs(max_epochs=1))
    trainer.fit(lightning_module_class()(), DataLoader(IndexedDataset(train), batch_size=8))

    model = make_model()
    opt = make_optimizer(model.parameters())
    tracker = ShapleyTracker(model, opt, val_data=val, per_query=True, query_path="exact",
                             val_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    for x, y, ids in DataLoader(IndexedDataset(train), batch_size=8):
        with tracker.batch(ids):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    tracker.detach()
    assert cb.values.shape == (len(train), len(val[0]))
    assert close(cb.values, tracker.values) and np.array_equal(cb.counts, tracker.counts)
