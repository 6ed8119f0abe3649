"""Bad input gets a clear error naming what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import (
    ConfigurationError,
    NonFiniteError,
    SampleIdError,
    ShapleyTracker,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
)

VAL = (torch.randn(4, 3), torch.randn(4, 1))


def rows(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean(1)


def make(model=None, opt=None, **kw):
    model = model or nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = opt or torch.optim.Adam(model.parameters(), lr=1e-2)
    kw.setdefault("val_data", VAL)
    kw.setdefault("val_loss_fn", rows)
    return model, opt, ShapleyTracker(model, opt, **kw)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"estimator": "tracin"}, ConfigurationError, "estimator must be one of"),
        ({"order": 3}, ConfigurationError, "order must be 1 or 2"),
        ({"order": 2, "estimator": "loo"}, ConfigurationError, "order=2 is defined for estimator='shapley'"),
        ({"val_data": None}, ConfigurationError, "needs a validation objective"),
        ({"val_loss_fn": "mse"}, ConfigurationError, "val_loss_fn must be callable"),
        ({"val_sample_size": 99}, ConfigurationError, "val_sample_size must be in 1..4"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        make(**kwargs)


def test_unsupported_optimizer_lists_the_supported_ones():
    model = nn.Linear(3, 1)
    with pytest.raises(UnsupportedOptimizerError, match=r"RMSprop.*supported: Adam, AdamW, SGD"):
        ShapleyTracker(model, torch.optim.RMSprop(model.parameters()), val_data=VAL, val_loss_fn=rows)


@pytest.mark.parametrize(
    "ids, message",
    [
        (None, "no sample ids"),
        ([], "no sample ids|empty"),
        ([[0, 1]], "1-D"),
        ([0.5, 1.5], "must be integers"),
        ([-1, 2], "non-negative"),
    ],
)
def test_bad_sample_ids(ids, message):
    _, _, tr = make()
    with pytest.raises(SampleIdError, match=message):
        tr.begin_batch(ids)


def test_step_without_marked_batch():
    model, opt, tr = make()
    F.mse_loss(model(VAL[0]), VAL[1]).backward()
    with pytest.raises(SampleIdError, match=r"no batch was marked.*tracker\.batch\(ids\)"):
        opt.step()


def test_ids_count_differs_from_batch_rows():
    model, opt, tr = make()
    with pytest.raises(SampleIdError, match="first dimension 4, but the batch has 3 sample ids"):
        with tr.batch([0, 1, 2]):
            model(VAL[0])


def test_same_sample_twice_in_one_step_is_two_occurrences():
    model, opt, tr = make()
    with tr.batch([0, 1]):
        F.mse_loss(model(VAL[0][:2]), VAL[1][:2]).backward()
    with tr.batch([1, 2]):  # sampling with replacement: id 1 again, in another micro-batch
        F.mse_loss(model(VAL[0][2:4]), VAL[1][2:4]).backward()
    opt.step()
    assert tr.counts.tolist() == [1, 2, 1]


def test_nan_training_loss():
    model, opt, tr = make()
    with tr.batch([0, 1, 2, 3]):
        (model(VAL[0]).sum() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        opt.step()


def test_nan_validation_loss():
    model, opt, tr = make(val_loss_fn=lambda m, b: m(b[0]).sum(1) * float("nan"))
    with tr.batch([0, 1, 2, 3]):
        F.mse_loss(model(VAL[0]), VAL[1]).backward()
    with pytest.raises(NonFiniteError, match="validation loss is NaN"):
        opt.step()


def test_validation_loss_with_wrong_row_count():
    model, opt, tr = make(val_loss_fn=lambda m, b: m(b[0]).flatten()[:2])
    with tr.batch([0, 1, 2, 3]):
        F.mse_loss(model(VAL[0]), VAL[1]).backward()
    with pytest.raises(ConfigurationError, match="returned 2 losses for a batch of 4 rows"):
        opt.step()


def test_batchnorm_in_training_mode_is_refused_with_what_to_do():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModuleError, match=r"1 \(BatchNorm1d\): BatchNorm in training mode couples"):
        make(model=model)


def test_batchnorm_switched_to_training_after_setup_is_caught_at_forward():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).eval()
    _, _, tr = make(model=model)
    model.train()
    with pytest.raises(UnsupportedModuleError, match="couples the samples"):
        with tr.batch([0, 1, 2, 3]):
            model(VAL[0])


def test_embedding_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 1))
    with pytest.raises(UnsupportedModuleError, match="scale_grad_by_freq"):
        ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       val_data=torch.zeros(2, 2, dtype=torch.long), val_loss_fn=lambda m, b: m(b).sum(1))


def test_attention_with_sequence_first_is_refused():
    model = nn.MultiheadAttention(4, 2)
    with pytest.raises(UnsupportedModuleError, match="batch_first=True"):
        ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       val_data=torch.zeros(2, 2, 4), val_loss_fn=lambda m, b: m(b, b, b)[0].sum((1, 2)))


def test_no_trainable_parameters():
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match="no trainable parameters"):
        ShapleyTracker(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), val_data=VAL, val_loss_fn=rows)
