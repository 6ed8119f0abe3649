"""Exact vs ghost per-query path: time and memory per step as a function of Q and sequence length.

Model: a small sequence model, Embedding(vocab 1000, 64) → Linear(64, 256) → GELU → Linear(256, 64)
→ Linear(64, 1000) head (next-token loss), trained with plain SGD so that the ghost path is exact
and the comparison is cost only (under Adam the ghost path also approximates P on Linear
weights; its cost is the same plus a per-step factorization). Every layer has a ghost form, so
the ghost variant needs no per-query gradient at all. ``--norm`` adds a LayerNorm before the
head: it has no ghost form and stays exact in both variants, so the ghost variant then also
pays the per-query (batched) backward down to it. Batch 16 training sequences of length T;
Q query sequences of length T (one query per row), validation chunks of 16 rows.

For each (T, Q) and each path (``exact``, ``ghost``, ``auto``) one subprocess trains a few steps
with a per-query :class:`ShapleyTracker` and reports:

* ``step ms``: median time of ``optimizer.step()`` (the tracker's validation pass, directions and
  scoring all run in its hooks; the training forward/backward is the same for every path);
* ``Δpeak MB``: peak RSS during the measured steps minus RSS at rest (the step's working memory),
  from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
* for ``auto``: how many of the 4 Embedding/Linear layers it sent to the ghost path.

The crossover printed is, per T, the smallest Q from which ghost is faster than exact.

Run:  python -m benchmarks.per_query_paths            # T ∈ {8, 32, 128}, Q ∈ {4, 16, 64, 256}
      python -m benchmarks.per_query_paths --quick    # T ∈ {8, 64}, Q ∈ {4, 32}
Options: --steps N, --threads N, --lengths ..., --queries ...
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import cli

VOCAB, D, HIDDEN, BATCH = 1000, 64, 256, 16
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # the workers run ``-m benchmarks.per_query_paths`` from here


class SeqModel(nn.Module):
    def __init__(self, norm: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
        self.ln = nn.LayerNorm(D) if norm else nn.Identity()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.ln(h))


def row_losses(model, seqs):
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none").mean(1)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(path: str, length: int, queries: int, steps: int, warmup: int, threads: int, norm: bool) -> dict:
    from inrun_shapley import ShapleyTracker

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SeqModel(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    val = torch.randint(0, VOCAB, (queries, length + 1), generator=g)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=row_losses, per_query=True, query_path=path,
                             record_steps=False, val_batch_size=16)
    times, rest, peak_ok = [], None, True
    for step in range(warmup + steps):
        if step == warmup:
            import gc

            gc.collect()
            rest = _rss_kb("VmRSS")
            peak_ok = _reset_peak()
        batch = torch.randint(0, VOCAB, (BATCH, length + 1), generator=g)
        with tracker.batch(torch.arange(BATCH) + step * BATCH):
            row_losses(model, batch).mean().backward()
        t0 = time.perf_counter()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        opt.zero_grad()
    peak = _rss_kb("VmHWM")
    ghost_layers = sum(r.path == "ghost" for r in tracker.query_plan)
    tracker.detach()
    return {"ms": 1e3 * statistics.median(times), "dpeak_mb": (peak - rest) / 1024 if peak_ok else float("nan"),
            "ghost_layers": ghost_layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_quick(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--queries", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    cli.add_threads(ap)
    ap.add_argument("--norm", action="store_true", help="add a LayerNorm (exact fallback) before the head")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        path, length, queries = args.worker.split(",")
        print(json.dumps(run_one(path, int(length), int(queries), args.steps, args.warmup, args.threads, args.norm)))
        return 0
    if args.quick:
        args.lengths, args.queries, args.steps, args.warmup = [8, 64], [4, 32], 3, 1
    print("command: " + cli.command_line("per_query_paths", argv))
    print(f"model: Embedding({VOCAB}, {D}) + Linear({D},{HIDDEN}) + Linear({HIDDEN},{D}) + "
          f"{'LayerNorm (exact fallback) + ' if args.norm else ''}"
          f"Linear({D},{VOCAB}); SGD; train batch {BATCH}; {args.threads} thread(s); median of {args.steps} steps")
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for length in args.lengths:
        for q in args.queries:
            res = {}
            for path in ("exact", "ghost", "auto"):
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.per_query_paths", "--worker", f"{path},{length},{q}", "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--threads", str(args.threads)] + (["--norm"] if args.norm else []),
                    capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                )
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                res[path] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((length, q, res))
    header = (f"{'T':>4} {'Q':>5} | {'exact ms':>9} {'ghost ms':>9} {'auto ms':>8} {'speedup':>8} | "
              f"{'exact ΔMB':>10} {'ghost ΔMB':>10} | {'auto: ghost layers':>18}")
    print(header)
    print("-" * len(header))
    for length, q, r in rows:
        print(f"{length:>4} {q:>5} | {r['exact']['ms']:>9.1f} {r['ghost']['ms']:>9.1f} {r['auto']['ms']:>8.1f} "
              f"{r['exact']['ms'] / r['ghost']['ms']:>7.2f}x | {r['exact']['dpeak_mb']:>10.1f} "
              f"{r['ghost']['dpeak_mb']:>10.1f} | {r['auto']['ghost_layers']:>14d} / 4")
    print("speedup = exact ms / ghost ms (>1: ghost faster)")
    for length in args.lengths:
        faster = [q for l_, q, r in rows if l_ == length and r["ghost"]["ms"] < r["exact"]["ms"]]
        slower = [q for l_, q, r in rows if l_ == length and r["ghost"]["ms"] >= r["exact"]["ms"]]
        if not faster:
            msg = f"exact faster for every Q measured (up to {max(args.queries)})"
        elif not slower:
            msg = f"ghost faster for every Q measured (from {min(args.queries)})"
        else:
            msg = f"ghost faster from Q = {min(faster)}" + (
                "" if min(faster) > max(slower) else f" (not monotone: exact faster at Q = {slower})")
        print(f"crossover at T = {length}: {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
