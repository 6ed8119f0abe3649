"""The step on a GPU: the same values as on the CPU, and no synchronization but the declared ones.

Marked ``gpu``: skipped without a CUDA device. ``torch.cuda.set_sync_debug_mode("error")`` around
a whole tracked step (forward, backward, ``optimizer.step()``) raises on any device
synchronization other than the step's declared reads (:mod:`inrun_shapley.host_reads`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _ce_rows(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _lm_rows(model, batch):
    x, y = batch
    logits = model(x)
    n = y.shape[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none").reshape(n, -1).mean(1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 5))


def _lm():
    from benchmarks.common.models import TinyTransformerLM

    torch.manual_seed(0)
    return TinyTransformerLM(40, 12, 32, 2, 2)


def _data(kind: str, g: torch.Generator):
    if kind == "mlp":
        x = torch.randn(64, 12, generator=g)
        return x, torch.randint(0, 5, (64,), generator=g), _ce_rows
    x = torch.randint(0, 40, (64, 12), generator=g)
    return x, torch.randint(0, 40, (64, 12), generator=g), _lm_rows


def _run(kind: str, device: str, dtype=torch.float64, steps: int = 4, optimizer: str = "adamw", sync_check=False,
         amp: torch.dtype | None = None, **options):
    g = torch.Generator().manual_seed(1)
    x, y, loss_rows = _data(kind, g)
    model = (_mlp() if kind == "mlp" else _lm()).to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    y = y.to(device)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    tr = ShapleyTracker(model, opt, val_data=(x[48:], y[48:]), val_loss_fn=loss_rows, step_check="raise", **options)
    for k in range(steps):
        ids = torch.arange(16) + 16 * (k % 3)
        rows = ids.to(device)
        if sync_check and k == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with tr.batch(ids):
                with torch.autocast("cuda", dtype=amp) if amp is not None else torch.autocast("cuda", enabled=False):
                    loss = loss_rows(model, (x[rows], y[rows])).mean()
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    tr.detach()
    return tr.values


@pytest.mark.parametrize("kind", ["mlp", "lm"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_values_on_the_gpu_equal_the_cpu_reference(kind, optimizer):
    cpu = _run(kind, "cpu", optimizer=optimizer)
    gpu = _run(kind, "cuda", optimizer=optimizer)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-9, atol=1e-12 * np.abs(cpu).max())


@pytest.mark.parametrize("kind", ["mlp", "lm"])
@pytest.mark.parametrize("options", [{}, {"estimator": "shapley"}, {"val_sample_size": 8}],
                         ids=["midpoint", "shapley", "sampled"])
def test_a_tracked_step_synchronizes_only_where_declared(kind, options):
    values = _run(kind, "cuda", dtype=torch.float32, sync_check=True, **options)
    assert np.isfinite(values).all() and np.abs(values).sum() > 0


def test_bf16_autocast_step_is_scored_without_hidden_sync():
    values = _run("lm", "cuda", dtype=torch.float32, sync_check=True, amp=torch.bfloat16)
    assert np.isfinite(values).all() and np.abs(values).sum() > 0


@pytest.mark.parametrize("kind", ["mlp", "lm"])
def test_compiled_kernels_on_the_gpu_equal_the_cpu_reference(kind):
    """``kernels="compiled"`` (a Triton kernel on CUDA) gives the list-wide kernels' CPU values."""
    cpu = _run(kind, "cpu")
    gpu = _run(kind, "cuda", kernels="compiled")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-9, atol=1e-12 * np.abs(cpu).max())
