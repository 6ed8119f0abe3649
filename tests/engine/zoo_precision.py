"""One zoo model's step values in a given precision, for comparing precisions side by side.

``step_values(name, precision, optimizer)`` trains a zoo model (``tests.engine.zoo_models``)
from one seed for ``steps`` steps and returns the concatenated per-step values:

* ``fp32``: float32 weights and compute (the reference);
* ``bf16-autocast``: float32 weights, forward under ``torch.autocast(dtype=bfloat16)``;
* ``bf16-weights``: the model, its inputs and its optimizer in bfloat16;
* ``fp16-scaler``: forward under fp16 autocast, loss scaled by a ``GradScaler`` (unscaled
  before the step, as the PyTorch AMP recipe does).

Used by ``tests/engine/test_model_zoo.py`` and ``benchmarks/precision_zoo.py``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from inrun_shapley import ShapleyTracker
from tests.engine.zoo_models import build

PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights", "fp16-scaler")


def _cast(rows, dtype):
    return tuple(r.to(dtype) if r.is_floating_point() else r for r in rows)


def step_values(name: str, precision: str, optimizer: str = "sgd", steps: int = 1, lr: float | None = None,
                seed: int = 0, warmup: int = 0) -> tuple[np.ndarray, list]:
    """``(values of every step concatenated, the first step's parameter update per parameter)``.

    ``warmup`` untracked fp32 steps first (the same in every precision), so that the steps
    compared start from one state with a filled optimizer state (not with ``bf16-weights``).
    """
    torch.manual_seed(seed)
    model, loss_rows, rows, val = build(name)
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    model = model.float()
    rows, val = _cast(rows, torch.float32), _cast(val, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr or 0.5)
    else:
        opt = torch.optim.AdamW(params, lr=lr or 1e-2, eps=1e-4)
    for _ in range(warmup):
        loss_rows(model, *rows).mean().backward()
        opt.step()
        opt.zero_grad()
    if dtype != torch.float32:
        if warmup:
            raise ValueError("bf16-weights starts from the seed: warmup=0")
        model.to(dtype)
        rows, val = _cast(rows, dtype), _cast(val, dtype)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=lambda m, b: loss_rows(m, *b).float())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if precision == "fp16-scaler" else None
    half = {"bf16-autocast": torch.bfloat16, "fp16-scaler": torch.float16}.get(precision)
    b = rows[0].shape[0]
    out, update = [], None
    for s in range(steps):
        before = [p.detach().float().clone() for p in params] if s == 0 else None
        ctx = torch.autocast("cpu", dtype=half) if half is not None else contextlib.nullcontext()
        with tracker.batch(torch.arange(b) + s * b):
            with ctx:
                loss = loss_rows(model, *rows).float().mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        if before is not None:
            update = [p.detach().float() - q for p, q in zip(params, before)]
        out.append(np.asarray(tracker.store.last_record[2]))
    tracker.detach()
    return np.concatenate(out), update


def agreement(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """``(max |got − ref| / max |ref|, Pearson r)``."""
    return float(np.abs(got - ref).max() / np.abs(ref).max()), float(np.corrcoef(got, ref)[0, 1])


def update_difference(got: list, ref: list) -> float:
    """``|Δθ_got − Δθ_ref| / |Δθ_ref|`` over every parameter (L2)."""
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float(r.pow(2).sum()) for r in ref)
    return (num / den) ** 0.5
