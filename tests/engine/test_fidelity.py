"""Fidelity: the tracker's one-step values against exact Shapley values of the real step.

The utility of a subset S of the batch is the validation-loss decrease of the step the real
optimizer would take from the same state if only S's contributions were in the gradient (with
Adam, the second moment then depends on S too). Exact Shapley values come from enumerating all
2^8 subsets (docs/math.md §11).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from inrun_shapley import ShapleyTracker
from inrun_shapley.metrics import pearson
from tests import oracles

B = 8


def _setup(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(64, 3, generator=g, dtype=torch.float64)).argmax(1)
    xv = torch.randn(32, 6, generator=g, dtype=torch.float64)
    yv = (xv @ w).argmax(1)
    return model, x, y, (xv, yv)


def _val_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def fidelity(estimator_orders, opt_factory, warmup=5, checks=4, seed=0):
    """Mean over checked steps of Pearson(tracker values, exact Shapley) per (estimator, order)."""
    results = {key: [] for key in estimator_orders}
    model, x, y, val = _setup(seed)
    opt = opt_factory(model.parameters())
    trackers = {
        key: ShapleyTracker(model, opt, val_data=val, val_loss_fn=_val_loss, estimator=key[0], order=key[1])
        for key in estimator_orders
    }
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(warmup + checks):
        idx = torch.randperm(len(x), generator=g)[:B]
        xb, yb = x[idx], y[idx]
        for tr in trackers.values():
            tr.begin_batch(idx)
        F.cross_entropy(model(xb), yb).backward()
        for tr in trackers.values():
            tr.after_backward()
            tr.end_batch()
        if step >= warmup:
            theta = oracles.trainable(model)
            snap = oracles.snapshot_state(opt, model)
            contrib = oracles.per_sample_grads(model, lambda f, xi, yi: F.cross_entropy(f(xi), yi), (xb, yb))
            contrib = {k: v / B for k, v in contrib.items()}
            kind = "sgd" if isinstance(opt, torch.optim.SGD) else "adam"

            def utility(subset):
                g_s = {k: c[list(subset)].sum(0) if subset else torch.zeros_like(c[0]) for k, c in contrib.items()}
                nxt = oracles.make_step(kind, snap, theta, g_s, frozen=False)(g_s)
                before = _val_loss(lambda a: functional_call(model, theta, (a,)), val).mean()
                after = _val_loss(lambda a: functional_call(model, nxt, (a,)), val).mean()
                return before - after

            exact = oracles.exact_shapley(utility, B).numpy()
        opt.step()
        opt.zero_grad()
        if step >= warmup:
            for key, tr in trackers.items():
                results[key].append(pearson(tr.store.last_record[2], exact))
    for tr in trackers.values():
        tr.detach()
    return {key: float(np.mean(v)) for key, v in results.items()}


@pytest.mark.slow
def test_adam_shapley_matches_exact_shapley_and_beats_sgd_form():
    keys = [("shapley", 1), ("shapley", 2), ("sgd", 1)]
    per_seed = [
        fidelity(keys, lambda p: torch.optim.Adam(p, lr=1e-2), seed=s) for s in range(2)
    ]
    mean = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
    assert mean[("shapley", 1)] >= 0.95, mean
    assert mean[("shapley", 2)] >= 0.98, mean
    assert mean[("shapley", 1)] > mean[("sgd", 1)], mean


@pytest.mark.slow
def test_adamw_shapley_matches_exact_shapley():
    keys = [("shapley", 1), ("shapley", 2)]
    res = fidelity(keys, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05), seed=3)
    assert res[("shapley", 1)] >= 0.95, res
    assert res[("shapley", 2)] >= 0.98, res


@pytest.mark.slow
def test_sgd_momentum_second_order_is_near_exact():
    keys = [("shapley", 1), ("shapley", 2)]
    res = fidelity(keys, lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), seed=4)
    assert res[("shapley", 2)] >= 0.99, res
