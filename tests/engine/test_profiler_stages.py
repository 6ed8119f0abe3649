"""The step's stages are named ranges in a profiler trace, and profiling changes no value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from inrun_shapley import ShapleyTracker
from inrun_shapley.engine.step import STAGES


def _run(estimator: str, profiled: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 2, generator=g)
    val = (torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g))
    tr = ShapleyTracker(model, opt, val_data=val, estimator=estimator,
                        val_loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1))
    names: set[str] = set()
    for step in range(3):
        ids = torch.arange(12) + 12 * step
        if profiled:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with tr.batch(ids):
                    F.mse_loss(model(x), y).backward()
                opt.step()
            names |= {e.key for e in prof.key_averages()}
        else:
            with tr.batch(ids):
                F.mse_loss(model(x), y).backward()
            opt.step()
        opt.zero_grad()
    values = tr.values.copy()
    tr.detach()
    return values, {n.split("/", 1)[1] for n in names if n.startswith("inrun_shapley/")}


@pytest.mark.parametrize("estimator, expected", [
    ("midpoint", {"before_step", "midpoint", "validation", "directions", "score", "grad_norm", "check", "to_host"}),
    ("shapley", {"before_step", "validation", "terms", "directions", "score", "grad_norm", "check", "to_host"}),
])
def test_stages_are_profiler_ranges_and_change_no_value(estimator, expected):
    plain, none_seen = _run(estimator, profiled=False)
    traced, seen = _run(estimator, profiled=True)
    assert none_seen == set()
    assert seen == expected, seen
    assert seen <= set(STAGES)
    assert np.abs(plain).sum() > 0
    np.testing.assert_array_equal(traced, plain)
