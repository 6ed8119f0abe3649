"""What the validation sample size trades (issue 23): cost per step against agreement with whole-set values.

A small CNN on the 8×8 digits (1,000 training rows, batch 32, a 200-row validation set, AdamW,
``--epochs`` epochs), trained once per variant on its own copy (same seed, same batches: the
trajectories are identical, only the validation rows of the tracker differ): ``plain`` (no
tracker), the tracker with the whole validation set every step (``val_sample_size=None``), and
with ``m`` rows drawn per step. Steps are interleaved across variants (the order rotates) and
timed on process CPU time, so the machine's other load inflates no variant more than another.

Reported per variant: step time × plain (median over steps), and the agreement of its run
totals with the whole-set run's (Pearson and Spearman over the training rows, and the overlap of
the 10% lowest-valued rows, what a pruning recipe would drop).

Run:  python -m benchmarks.val_sample [--epochs 2] [--sizes 8 16 32 64] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import cli
from inrun_shapley import ShapleyTracker
from inrun_shapley.app.digits import load_digits_splits


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))


def ce_rows(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def run(args) -> list[str]:
    n_train, n_val = (200, 50) if args.quick else (1000, 200)
    (xt, yt), (xv, yv) = load_digits_splits([n_train, n_val], 0)
    variants: dict[str, dict] = {"plain": {}}
    for m in [None] + [m for m in args.sizes if m < n_val]:
        variants["whole set" if m is None else f"m={m}"] = {"val_sample_size": m}
    runs = {}
    for name, opts in variants.items():
        model = cnn()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tr = None if name == "plain" else ShapleyTracker(model, opt, val_data=(xv, yv), val_loss_fn=ce_rows, **opts)
        runs[name] = (model, opt, tr, [])
    g = torch.Generator().manual_seed(1)
    order = [torch.randperm(n_train, generator=g) for _ in range(args.epochs)]
    batches = [idx for perm in order for idx in perm.split(32)]
    names = list(runs)
    for k, idx in enumerate(batches):
        r = k % len(names)
        for name in names[r:] + names[:r]:
            model, opt, tr, times = runs[name]
            c0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            if tr is None:
                ce_rows(model, (xt[idx], yt[idx])).mean().backward()
            else:
                with tr.batch(idx):
                    ce_rows(model, (xt[idx], yt[idx])).mean().backward()
            opt.step()
            times.append(time.process_time() - c0)
    plain = statistics.median(runs["plain"][3])
    whole = runs["whole set"][2].values
    low = set(np.argsort(whole)[: n_train // 10].tolist())
    lines = [f"command: {cli.command_line('val_sample', args.argv)}",
             f"digits CNN, {n_train} training rows, batch 32, {n_val}-row validation set, AdamW, {len(batches)} steps; "
             "step time on process CPU time, variants interleaved",
             f"  {'variant':<12} {'x plain':>8} {'Pearson':>8} {'Spearman':>9} {'low-10% overlap':>16}"]
    for name in names:
        model, opt, tr, times = runs[name]
        ratio = statistics.median(times) / plain
        if tr is None:
            lines.append(f"  {name:<12} {ratio:8.2f}")
            continue
        v = tr.values
        pear = float(np.corrcoef(v, whole)[0, 1])
        rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
        spear = float(np.corrcoef(rank(v), rank(whole))[0, 1])
        overlap = len(low & set(np.argsort(v)[: n_train // 10].tolist())) / max(1, len(low))
        lines.append(f"  {name:<12} {ratio:8.2f} {pear:8.3f} {spear:9.3f} {overlap:16.2f}")
        tr.detach()
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    cli.add_quick(ap, help="a smaller run (smoke test)")
    args = ap.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(1)
    print("\n".join(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
