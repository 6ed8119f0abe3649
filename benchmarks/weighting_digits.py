"""LDS of gradient-similarity attribution with uniform vs learned parameter-group weights.

Its own linear-datamodeling setup on scikit-learn's digits (no download; written before
``benchmarks.lds_harness``, kept so the recorded figures stay reproducible):

* pool of 600 training samples, 50 LDS query samples and 100 separate "fit" query samples,
  all drawn from the 1,797 digits with the seed;
* a 64-32-32-10 tanh MLP trained with Adam (lr 3e-3, batch 32, 20 epochs, same initialization
  and the same batch-order generator for every model of one seed);
* reference model trained on the full pool, with 10 checkpoints (end of every 2nd epoch) and
  Adam's preconditioner ``1/(sqrt(v̂)+ε)`` at each;
* M models retrained on random α = 0.5 subsets; measured output = query margin
  ``logit_y − logsumexp(other logits)``;
* scores: per-tensor group components of the TracIn-style dot product (query side: gradient of
  −margin, so positive = raises the margin), plain and Adam-preconditioned; weights uniform,
  fitted on the separate fit queries, or fitted on the LDS queries themselves (the objective
  is label-free, it never sees the retrained models). Default ``FitConfig`` (8 restarts, the
  lowest objective wins; nothing tuned on LDS).

Run:  python -m benchmarks.weighting_digits [--seeds 0 1 2] [--models 100] [--plot out.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.common import cli
from benchmarks.common.data import load_digits_splits
from benchmarks.common.models import mlp
from inrun_shapley.metrics import linear_datamodeling_score
from inrun_shapley.posthoc.weighting import (
    FitConfig,
    GroupWeights,
    adam_preconditioner,
    compute_group_components,
    fit_weights,
    plot_group_weights,
    reweigh,
)

N_POOL, N_LDS, N_FIT = 600, 50, 100
EPOCHS, BATCH, LR, CKPT_EVERY = 20, 32, 3e-3, 2


def make_model(seed: int) -> nn.Module:
    """The 64-32-32-10 tanh MLP, initialized from ``seed``."""
    return mlp((32, 32), activation="tanh", seed=seed)


def train(x, y, seed: int, record: bool = False):
    """Train one model; with ``record`` also return checkpoints and Adam preconditioners."""
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed + 1)
    ckpts, preconds = [], []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), BATCH):
            idx = order[s : s + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if record and (epoch + 1) % CKPT_EVERY == 0:
            ckpts.append({n: p.detach().clone() for n, p in model.named_parameters()})
            preconds.append(adam_preconditioner(opt, model))
    return (model, ckpts, preconds) if record else model


def margin(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    correct = outputs.gather(1, y[:, None]).squeeze(1)
    mask = torch.arange(outputs.shape[1], device=outputs.device) == y[:, None]  # vmap-safe one-hot
    others = outputs.masked_fill(mask, float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def neg_margin_loss(outputs, y):
    return -margin(outputs, y).sum()


def run_seed(seed: int, n_models: int, plot: str | None):
    rng = np.random.default_rng(seed)  # one permutation for the split, then the subset draws
    (x, y), (xq, yq), (xf, yf) = load_digits_splits((N_POOL, N_LDS, N_FIT), rng, scale="unit")

    t0 = time.perf_counter()
    subsets = np.zeros((n_models, N_POOL), dtype=bool)
    outputs = np.zeros((n_models, N_LDS))
    for m in range(n_models):
        subsets[m, rng.choice(N_POOL, N_POOL // 2, replace=False)] = True
        idx = torch.from_numpy(np.flatnonzero(subsets[m]))
        model = train(x[idx], y[idx], seed=1000 * seed)
        with torch.no_grad():
            outputs[m] = margin(model(xq), yq).numpy()
    t_retrain = time.perf_counter() - t0

    ref, ckpts, preconds = train(x, y, seed=1000 * seed, record=True)
    lrs = [LR] * len(ckpts)
    results, timings, learned = {}, {}, {}
    for base, pc in (("grad_dot", None), ("grad_dot+adam", preconds)):
        common = dict(checkpoints=ckpts, lrs=lrs, preconditioner=pc, query_loss_fn=neg_margin_loss, batch_size=200)
        comps_lds, w_fit, w_self, labelled, timings[base] = fit_on_both_query_sets(
            lambda queries: compute_group_components(ref, F.cross_entropy, (x, y), queries, "tensor", **common),
            (xq, yq), (xf, yf), base, seed,
        )
        learned[base] = w_fit
        results[(base, "weights fitted on LDS queries")] = w_self
        for label, w in labelled:
            results[(base, label)] = linear_datamodeling_score(reweigh(comps_lds, w), subsets, outputs)
        results[(base, "objective uniform->fitted")] = (w_fit.fit_info["uniform_objective"], w_fit.objective_trace.min())
    if plot:
        plot_group_weights({k: v for k, v in learned.items()}, plot.replace(".png", f"_seed{seed}.png"))
    return results, learned, t_retrain, timings


def fit_on_both_query_sets(components_for, lds_queries, fit_queries, base: str, seed: int):
    """Components on the LDS and the fitting queries, weights fitted on each (label-free).

    Args:
        components_for: ``queries -> GroupComponents`` for one base method.

    Returns:
        ``(LDS-query components, weights fitted on the fitting queries, weights fitted on the LDS
        queries, [(label, weights)] to evaluate, (components seconds, seconds per fit))``.
        Shared with ``benchmarks.weighting_text``.
    """
    t1 = time.perf_counter()
    comps_lds = components_for(lds_queries)
    comps_fit = components_for(fit_queries)
    t2 = time.perf_counter()
    w_fit = fit_weights(comps_fit, FitConfig(seed=seed), aspect=f"{base} (fit queries)")
    w_self = fit_weights(comps_lds, FitConfig(seed=seed), aspect=f"{base} (LDS queries)")
    t3 = time.perf_counter()
    labelled = (
        ("uniform", GroupWeights.uniform(comps_lds.group_names)),
        ("learned/fit-queries", w_fit),
        ("learned/LDS-queries", w_self),
    )
    return comps_lds, w_fit, w_self, labelled, (t2 - t1, (t3 - t2) / 2)


def print_seed_results(results: dict, table: dict, name_of) -> None:
    """Print one seed's results (learned weights, objective before -> after, LDS values) and
    append its LDS values to ``table`` (key -> list over seeds). Shared with ``benchmarks.weighting_text``."""
    for key, val in results.items():
        name = name_of(key)
        if isinstance(val, GroupWeights):
            print(f"  {name} " + " ".join(f"{g}={w:.3f}" for g, w in val.as_dict().items()))
        elif isinstance(val, tuple):
            print(f"  {name} {val[0]:.4f} -> {val[1]:.4f}")
        else:
            print(f"  {name} LDS {val:.4f}")
            table.setdefault(key, []).append(val)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_seeds(parser, [0, 1, 2])
    parser.add_argument("--models", type=int, default=100, help="retrained subset models per seed")
    parser.add_argument("--plot", default=None, help="write weight bar plots to this PNG path (per seed)")
    cli.add_threads(parser)
    args = parser.parse_args(argv)
    cli.set_threads(args.threads)

    table: dict = {}
    for seed in args.seeds:
        results, learned, t_retrain, timings = run_seed(seed, args.models, args.plot)
        print(f"\n=== seed {seed}: {args.models} retrained models in {t_retrain:.1f}s")
        for base, (tc, tf) in timings.items():
            print(f"{base}: components {tc:.2f}s (fit + LDS queries), one fit {tf:.2f}s")
            print(learned[base].table())
        print_seed_results(results, table, lambda key: f"{key[0]:<14} {key[1]:<28}")

    print(f"\n=== LDS, mean ± std over seeds {args.seeds} (M={args.models}, per-tensor groups)")
    for (base, label), vals in table.items():
        print(f"  {base:<14} {label:<22} {np.mean(vals):.4f} ± {np.std(vals):.4f}   "
              + " ".join(f"{v:.4f}" for v in vals))


if __name__ == "__main__":
    main()
