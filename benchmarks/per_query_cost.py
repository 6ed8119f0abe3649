"""Per-query values for a handful of queries against the single-direction step (issue 15).

A small CNN on 8×8 inputs (Conv2d(1→8) + MLP head, AdamW, batch 32, 1 CPU thread, median step
time over 60 steps after 3, the kinds interleaved step by step): plain training, the single-direction tracker with the whole
300-row validation set and with 4 rows, and per-query values for those 4 rows (``[n, 4]``).

Run::

    python -m benchmarks.per_query_cost
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def _rows(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _variant(kind: str, val):
    """``(model, optimizer, tracker or None)`` for one kind of step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = None
    if kind == "single, 300 val rows":
        tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_rows)
    elif kind == "single, 4 val rows":
        tracker = ShapleyTracker(model, opt, val_data=(val[0][:4], val[1][:4]), val_loss_fn=_rows)
    elif kind == "per-query, 4 queries":
        tracker = ShapleyTracker(model, opt, val_data=(val[0][:4], val[1][:4]), val_loss_fn=_rows, per_query=True)
    return model, opt, tracker


def step_ms(kinds: list[str], x, y, val, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median CPU milliseconds of one training step of each kind, the kinds interleaved step by
    step (each on its own model), over ``steps`` steps after ``warmup``."""
    variants = {k: _variant(k, val) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    batches = torch.arange(len(x)).split(32)
    for s in range(warmup + steps):
        ids = batches[s % len(batches)]
        for kind, (model, opt, tracker) in variants.items():
            t = time.process_time()
            if tracker is not None:
                with tracker.batch(ids + len(x) * (s // len(batches))):
                    F.cross_entropy(model(x[ids]), y[ids]).backward()
            else:
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
            if s >= warmup:
                times[kind].append(time.process_time() - t)
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="measured steps per kind (interleaved)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 1, 8, 8, generator=g), torch.randint(0, 10, (512,), generator=g)
    val = (torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g))
    print(f"command: python -m benchmarks.per_query_cost --steps {args.steps}")
    kinds = ["plain", "single, 300 val rows", "single, 4 val rows", "per-query, 4 queries"]
    ms = step_ms(kinds, x, y, val, args.steps)
    for k in kinds:
        print(f"  {k:<24} {ms[k]:7.2f} ms  {ms[k] / ms['plain']:5.2f}x plain")
    print(f"  per-query (4) / single (same 4 rows): {ms['per-query, 4 queries'] / ms['single, 4 val rows']:.2f}x")


if __name__ == "__main__":
    main()
