"""Messages that point the user the right way (issue 25)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from inrun_shapley import ShapleyTracker
from inrun_shapley.errors import ConfigurationError, NonFiniteError, SampleIdError
from inrun_shapley.log import ShapleyLogWriter

LOSS = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731


def _setup(**kw):
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, x, y, ShapleyTracker(model, opt, val_data=(x[:4], y[:4]), val_loss_fn=LOSS, **kw)


def _step(tracker, model, opt, x, y, ids):
    with tracker.batch(ids):
        LOSS(model, (x[: len(ids)], y[: len(ids)])).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("as_list", [False, True])
def test_uint64_ids_above_int64_are_refused_with_the_users_numbers(tmp_path, as_list):
    big = np.array([2**63 + 5, 2**64 - 1, 3], dtype=np.uint64)
    ids = [int(v) for v in big] if as_list else big
    model, opt, x, y, tracker = _setup()
    with pytest.raises(SampleIdError, match=r"below 2\*\*63.*\[9223372036854775813, 18446744073709551615\]"):
        _step(tracker, model, opt, x, y, ids)
    with pytest.raises(SampleIdError, match=r"9223372036854775813.*ids & \(2\*\*63 - 1\)"):
        ShapleyLogWriter(tmp_path / "log").add_step(1, ids, np.ones(3))
    _step(tracker, model, opt, x, y, (big & np.uint64(2**63 - 1)).astype(np.int64))  # the advice works
    assert tracker.step == 1


def test_nan_in_a_training_row_blames_training_and_is_not_counted():
    model, opt, x, y, tracker = _setup()
    _step(tracker, model, opt, x, y, torch.arange(4))
    x = x.clone()
    x[5, 1] = float("nan")
    for _ in range(2):  # and again: the failed step left nothing behind
        with pytest.raises(NonFiniteError, match=r"step 2: the training gradient.*not at fault.*ids 4, 5, 6, 7") as e:
            with tracker.batch(torch.arange(4, 8)):
                LOSS(model, (x[4:8], y[4:8])).mean().backward()
            opt.step()
        opt.zero_grad()
        assert "validation loss" not in str(e.value)
        assert tracker.step == 1 and tracker.store.last_step == 1


def test_nan_validation_loss_still_blames_validation():
    model, opt, x, y, tracker = _setup()
    tracker.validation.loss_fn = lambda m, b: LOSS(m, b) * float("nan")
    with pytest.raises(NonFiniteError, match="validation loss is NaN"):
        _step(tracker, model, opt, x, y, torch.arange(4))
    assert tracker.step == 0


def test_step_values_with_records_off_says_how_to_turn_them_on():
    model, opt, x, y, tracker = _setup()
    _step(tracker, model, opt, x, y, torch.arange(4))
    with pytest.raises(ConfigurationError, match=r"record_steps=True"):
        tracker.step_values()
    model, opt, x, y, tracker = _setup(record_steps=True)
    _step(tracker, model, opt, x, y, torch.arange(4))
    table = tracker.step_values()
    assert set(table) == {"step", "id", "value"} and table["id"].tolist() == [0, 1, 2, 3]


def test_sparse_ids_point_to_an_accessor_that_exists():
    model, opt, x, y, tracker = _setup()
    _step(tracker, model, opt, x, y, torch.tensor([3, 10**15]))
    with pytest.raises(SampleIdError, match=r"totals\(\)") as e:
        tracker.values
    assert "table()" not in str(e.value)
    t = tracker.totals()  # what the message names
    assert t["ids"].tolist() == [3, 10**15] and t["count"].tolist() == [1, 1]
