"""Host reads per step: a constant, whatever the model's size (DESIGN §7 "Host reads").

On a GPU every read of a tensor's value on the host waits for the device. The test counts, on
CPU, every call that reads a value to the host (``.item()``, ``bool()``, ``float()``, ``int()``,
``.tolist()``, ``.numpy()``, ``np.asarray(tensor)``, ``.cpu()``) during one training step with
the tracker, minus the same step without it, for a 4-layer and a 32-layer MLP.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "__array__", "cpu")
BUDGET = 4


@contextmanager
def counting_reads():
    """Count host reads of any tensor while the block runs (``calls[0]``)."""
    calls = [0]
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            calls[0] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _mlp(layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods = [nn.Linear(6, 8)]
    for _ in range(layers - 2):
        mods += [nn.Tanh(), nn.Linear(8, 8)]
    mods += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*mods)


def _mse_rows(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(1)


def _reads_per_step(layers: int, optimizer: str, tracked: bool, **options) -> int:
    model = _mlp(layers)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    val = (torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, **options) if tracked else None
    ids = torch.arange(16)
    counts = []
    for _ in range(3):  # the first steps create the optimizer state; the last one is counted
        with counting_reads() as calls:
            if tr is not None:
                with tr.batch(ids):
                    F.mse_loss(model(x), y).backward()
            else:
                F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        counts.append(calls[0])
    if tr is not None:
        tr.detach()
    return counts[-1]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("options", [{}, {"estimator": "shapley"}, {"val_sample_size": 4}], ids=["midpoint", "shapley", "sampled"])
def test_host_reads_per_step_are_few_and_independent_of_depth(optimizer, options):
    added = {layers: _reads_per_step(layers, optimizer, True, **options) - _reads_per_step(layers, optimizer, False)
             for layers in (4, 32)}
    assert added[4] == added[32], added
    assert added[4] <= BUDGET, added


def test_the_counter_sees_reads():
    t = torch.ones(3)
    with counting_reads() as calls:
        t.sum().item(), bool(t.any()), float(t[0]), t.tolist(), t.numpy(), t.cpu()
    assert calls[0] >= 6
