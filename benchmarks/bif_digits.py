"""Benchmark: Bayesian Influence Function on a small digits MLP.

Trains a 64-32-10 tanh MLP on 1,000 ``load_digits`` images (AdamW, full-batch-ish, a few
seconds), then estimates the BIF of all 1,000 training samples on 100 held-out queries for each
sampler setting below, twice (two seeds). Prints, per setting: wall time of one query set (one
``bayesian_influence`` call), diagnostics (split-R̂, ESS, drift), the seed-to-seed rank stability
(mean per-query Spearman between the two seeds), and the mean per-query Spearman against the
exact damped influence function ``−∇φᵀ(nβH + γI)⁻¹∇ℓ_i`` (Hessian by ``torch.func``; what the BIF
approaches at large γ).

Observable: the query's cross-entropy loss (``--observable loss``, default) or its margin
(correct logit minus the largest other logit, ``--observable margin``).

Run::

    python -m benchmarks.bif_digits                   # both settings, ~1-2 min on one CPU core
    python -m benchmarks.bif_digits --quick           # fewer draws
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import cli
from benchmarks.common.data import load_digits_splits
from benchmarks.common.models import mlp
from inrun_shapley.metrics import spearman
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence, rank_stability


def make_data(seed: int = 0, n_train: int = 1000, n_queries: int = 100):
    """``((x_train, y_train), (x_query, y_query))``: digits shuffled with ``seed``, intensities / 16."""
    train, queries = load_digits_splits((n_train, n_queries), seed, scale="unit")
    return train, queries


def make_model(seed: int = 0) -> nn.Module:
    """The 64-32-10 tanh MLP, initialized from ``seed``."""
    return mlp((32,), activation="tanh", seed=seed)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def margin_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return correct - other


def train(model: nn.Module, train_set, steps: int = 400, lr: float = 1e-2, seed: int = 0) -> None:
    x, y = train_set
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        loss_fn(model, (x[idx], y[idx])).mean().backward()
        opt.step()


def damped_influence(model, train_set, queries, observable, n_beta: float, gamma: float) -> torch.Tensor:
    """Exact ``−∇φ_qᵀ(nβ·H + γI)⁻¹∇ℓ_i``, H = Hessian of the mean training loss at w* (fp64)."""
    from torch.func import functional_call, hessian, jacrev

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model64 = make_model().double()
    x_tr, y_tr = train_set[0].double(), train_set[1]
    x_q, y_q = queries[0].double(), queries[1]

    def call(w, fn, batch):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            params[name] = w[i : i + k].reshape(shape)
            i += k
        return fn(lambda inp: functional_call(model64, params, (inp,)), batch)

    h = hessian(lambda w: call(w, loss_fn, (x_tr, y_tr)).mean())(w0)
    g_train = jacrev(lambda w: call(w, loss_fn, (x_tr, y_tr)))(w0)
    g_query = jacrev(lambda w: call(w, observable, (x_q, y_q)))(w0)
    system = n_beta * h + gamma * torch.eye(len(w0), dtype=torch.float64)
    return -(g_train @ torch.linalg.solve(system, g_query.T)).float()


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.nanmean([spearman(a[:, q], b[:, q]) for q in range(a.shape[1])]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_quick(parser, help="fewer draws (smoke run)")
    parser.add_argument("--observable", choices=["loss", "margin"], default="loss")
    cli.add_seeds(parser, [0, 1], nargs=2)
    parser.add_argument("--no-exact", action="store_true", help="skip the exact damped IF reference")
    cli.add_threads(parser)
    args = parser.parse_args(argv)
    cli.set_threads(args.threads)

    train_set, queries = make_data()
    model = make_model()
    t0 = time.perf_counter()
    train(model, train_set)
    with torch.no_grad():
        acc = (model(queries[0]).argmax(1) == queries[1]).float().mean().item()
        train_loss = loss_fn(model, train_set).mean().item()
    print(f"MLP 64-32-10: trained in {time.perf_counter() - t0:.1f} s, train loss {train_loss:.3f}, "
          f"query accuracy {acc:.3f}, {sum(p.numel() for p in model.parameters())} parameters")

    observable = loss_fn if args.observable == "loss" else margin_fn
    loader = DataLoader(TensorDataset(*train_set), batch_size=64, shuffle=True)
    scale = 4 if args.quick else 1
    settings = {
        "defaults before issue 27 (eps=1e-4, nbeta=B/logB, gamma=1e3, 4x200)": BIFConfig(
            step_size=1e-4, gamma=1e3, draws=200, burn_in=None, thin=1, control_variate=None),
        "prototype tuned (eps=2e-3, nbeta=50, gamma=20, 4x1000)": BIFConfig(
            step_size=2e-3, n_beta=50.0, gamma=20.0, draws=1000 // scale, burn_in=None, thin=1, control_variate=None),
        "large gamma (eps=2e-4, nbeta=50, gamma=1e3, 4x500, thin 2)": BIFConfig(
            step_size=2e-4, n_beta=50.0, gamma=1e3, draws=500 // scale, thin=2, burn_in=None, control_variate=None),
    }
    for name, base in settings.items():
        runs = []
        for seed in args.seeds:
            cfg = BIFConfig(**{**base.__dict__, "seed": seed})
            runs.append(bayesian_influence(model, loss_fn, loader, train_set, queries, config=cfg,
                                           observable_fn=observable, progress=False))
        r = runs[0]
        d = r.diagnostics
        line = (f"\n[{name}]\n  time per query set: {np.mean([x.seconds for x in runs]):.1f} s "
                f"({r.config.chains * r.config.steps_per_chain} SGLD steps, {r.n_draws} draws)\n"
                f"  R-hat {d.rhat:.3f}, ESS {d.ess:.0f}, per-sample ESS median "
                f"{float(np.nanmedian(d.ess_per_sample.numpy())):.0f}, drift {100 * d.drift_fraction:.2f}%\n"
                f"  seed-to-seed rank stability (mean per-query Spearman): {rank_stability(runs[0], runs[1]):.3f}")
        if not args.no_exact:
            t1 = time.perf_counter()
            exact = damped_influence(model, train_set, queries, observable, r.n_beta, r.config.gamma)
            line += (f"\n  vs exact damped IF (nbeta={r.n_beta:.3g}, gamma={r.config.gamma:g}; "
                     f"{time.perf_counter() - t1:.1f} s): mean per-query Spearman "
                     f"{mean_spearman(r.bif, exact):.3f} (seed {args.seeds[0]}), "
                     f"{mean_spearman(runs[1].bif, exact):.3f} (seed {args.seeds[1]})")
        print(line, flush=True)


if __name__ == "__main__":
    main()
