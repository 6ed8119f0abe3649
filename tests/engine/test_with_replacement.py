"""Sampling with replacement: each occurrence of an id in a step is a player (issue 25).

nanoGPT draws ``torch.randint`` batches and ``WeightedRandomSampler(replacement=True)`` repeats
rows; both used to stop at "duplicate sample ids in one batch". Brute force: exact Shapley of
the real step with every row a player (``oracles.exact_shapley_per_id``), on a quadratic game
(linear model, MSE, plain SGD) where the midpoint rule is exact, so the tolerance is rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from inrun_shapley import ShapleyTracker
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from tests import oracles

LR = 0.3


def _val_loss(model, batch):
    return F.mse_loss(model(batch[0]), batch[1], reduction="none").mean(1)


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    val = (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))
    model = nn.Linear(3, 2).double()
    return model, x, y, val


def _exact(model, x, y, val, rows):
    """Exact per-id Shapley values of one SGD step on the rows ``rows`` (repeats = players)."""
    n = len(rows)
    xb, yb = x[rows], y[rows]
    contrib = oracles.per_sample_grads(model, lambda f, xi, yi: F.mse_loss(f(xi), yi), (xb, yb))
    contrib = {k: v / n for k, v in contrib.items()}
    theta = oracles.trainable(model)

    def utility(subset):
        nxt = {k: theta[k] - LR * (c[list(subset)].sum(0) if subset else 0.0) for k, c in contrib.items()}
        before = _val_loss(lambda a: functional_call(model, theta, (a,)), val).mean()
        after = _val_loss(lambda a: functional_call(model, nxt, (a,)), val).mean()
        return before - after

    return oracles.exact_shapley_per_id(utility, rows)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_repeated_ids_are_each_a_player_and_sum_per_id(tmp_path, micro_batches):
    model, x, y, val = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    writer = ShapleyLogWriter(tmp_path / "log", flush_every=0)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_val_loss, sink=writer)
    steps = [[0, 1, 1, 2, 3, 3, 3], [4, 4, 5, 0, 2, 5, 4]]  # torch.randint-style batches
    want_values, want_counts = np.zeros(6), np.zeros(6, dtype=np.int64)
    for rows in steps:
        exact = _exact(model, x, y, val, rows)
        for i, v in exact.items():
            want_values[i] += v
        np.add.at(want_counts, rows, 1)
        parts = [rows] if micro_batches == 1 else [rows[:3], rows[3:]]  # repeats across micro-batches too
        for part in parts:
            with tracker.batch(torch.tensor(part)):
                (F.mse_loss(model(x[part]), y[part], reduction="none").mean(1).sum() / len(rows)).backward()
        opt.step()
        opt.zero_grad()
    np.testing.assert_allclose(tracker.values, want_values, rtol=1e-9, atol=1e-13)
    np.testing.assert_array_equal(tracker.counts, want_counts)
    writer.close()
    log = ShapleyLog.load(tmp_path / "log")
    np.testing.assert_allclose(log.values, want_values, rtol=1e-9, atol=1e-13)
    np.testing.assert_array_equal(log.counts, want_counts)


def test_weighted_random_sampler_with_replacement_runs():
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    from inrun_shapley import IndexedDataset

    model, x, y, val = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_val_loss)
    sampler = WeightedRandomSampler([5.0, 1, 1, 1, 1, 1], num_samples=24, replacement=True,
                                    generator=torch.Generator().manual_seed(0))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8, sampler=sampler)
    drawn = np.zeros(6, dtype=np.int64)
    for xb, yb, ids in loader:
        np.add.at(drawn, ids.numpy(), 1)
        with tracker.batch(ids):
            F.mse_loss(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert drawn.max() > 3  # the sampler did repeat rows within batches
    np.testing.assert_array_equal(tracker.counts, drawn)
