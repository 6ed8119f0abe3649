"""Sample ids reach the adapters without changing the batch the user's code receives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from inrun_shapley import ConfigurationError, IndexedDataset
from tests.callbacks.integration_setup import close, data, make_model, make_optimizer, plain_values, trainer_kwargs

pl = pytest.importorskip("lightning.pytorch")


class TupleModule(pl.LightningModule):
    """A user's module, written without any knowledge of sample ids."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, list) and len(batch) == 2
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return make_optimizer(self.parameters())


class DictRows(Dataset):
    def __init__(self, train):
        self.train = train

    def __len__(self):
        return len(self.train)

    def __getitem__(self, i):
        x, y = self.train[i]
        return {"x": x, "y": y}


class DictModule(TupleModule):
    def training_step(self, batch, batch_idx):
        assert sorted(batch) == ["x", "y"]
        return F.cross_entropy(self(batch["x"]), batch["y"])


def test_lightning_module_unpacking_x_y_trains_unchanged_and_equals_the_plain_tracker():
    from inrun_shapley import ShapleyCallback

    train, val = data()
    cb = ShapleyCallback(val_data=val)
    pl.Trainer(callbacks=[cb], **trainer_kwargs()).fit(TupleModule(), DataLoader(IndexedDataset(train), batch_size=8))
    ref, counts = plain_values()
    assert close(cb.values, ref) and np.array_equal(cb.counts, counts)


def test_lightning_dict_items_keep_their_keys():
    from inrun_shapley import ShapleyCallback

    train, val = data()
    cb = ShapleyCallback(val_data=val)
    pl.Trainer(callbacks=[cb], **trainer_kwargs()).fit(DictModule(), DataLoader(IndexedDataset(DictRows(train)), batch_size=8))
    assert close(cb.values, plain_values()[0])


def test_accelerate_hook_takes_the_ids_out_of_the_whole_batch():
    from accelerate import Accelerator

    from inrun_shapley import ShapleyHook

    train, val = data()
    accelerator = Accelerator(cpu=True)
    model = make_model()
    opt = make_optimizer(model.parameters())
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(IndexedDataset(train), batch_size=8))
    with ShapleyHook(accelerator, model, opt, val_data=val) as hook:
        for _ in range(2):
            for batch in loader:
                with hook.batch(batch):
                    x, y = batch
                    accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
    ref, counts = plain_values()
    assert close(hook.values, ref) and np.array_equal(hook.counts, counts)


def test_own_ids_with_ids_fn_are_left_in_the_batch():
    from inrun_shapley.integration import take_sample_ids

    batch = {"x": torch.zeros(3, 2), "index": torch.tensor([4, 5, 6])}
    assert take_sample_ids(batch).tolist() == [4, 5, 6] and "index" in batch
    batch = [torch.zeros(3, 2), torch.tensor([7, 8, 9])]
    assert take_sample_ids(batch, ids_fn=lambda b: b[1]).tolist() == [7, 8, 9] and len(batch) == 2


@pytest.mark.parametrize("item, kind", [
    (torch.zeros(3), "Tensor"),
    (__import__("collections").namedtuple("Row", "x y")(torch.zeros(3), 1), "named tuple"),
    ({"index": 3, "x": torch.zeros(3)}, "already have an 'index' key"),
])
def test_items_without_room_for_an_id_are_refused_with_what_to_pass(item, kind):
    with pytest.raises(ConfigurationError, match=kind) as err:
        IndexedDataset([item])
    assert "ids_fn" in str(err.value)


def test_two_callbacks_on_one_trainer_both_get_the_ids():
    from inrun_shapley import ShapleyCallback

    train, val = data()
    shapley, sgd = ShapleyCallback(val_data=val), ShapleyCallback(val_data=val, estimator="sgd")
    pl.Trainer(callbacks=[shapley, sgd], **trainer_kwargs()).fit(
        TupleModule(), DataLoader(IndexedDataset(train), batch_size=8))
    assert close(shapley.values, plain_values()[0]) and close(sgd.values, plain_values(estimator="sgd")[0])
