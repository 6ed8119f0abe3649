"""LDS at small removals, as MAGIC measures it (DESIGN notes, issue 27).

The harness of :mod:`benchmarks.lds_harness` retrains each subset model with its *own* batch
order (``order_seed + 1 + m``), so two runs differ by far more than the removed rows: at a 1–5 %
removal that training noise swamps the effect of the rows for every method alike. Here every
retraining keeps the full run's seed, batch order and batch boundaries; a removed row stays in
its batch with weight 0 and the batch mean keeps its denominator::

    loss_s = Σ_{i ∈ B_s} w_i·ℓ_i / |B_s|,    w_i = 0 if i was removed else 1

so the runs differ only by the removed rows (with ``w = 1`` the loop is the full-data run).

:func:`removal_setup` draws ``n_models`` random removal sets of ``round(fraction·n_train)`` rows
(seeded), retrains, and caches the query outputs next to the harness's cache
(``<setup.path>/removal_<fraction>_<M>_<seed>.npz``). The result is an
:class:`~benchmarks.lds_harness.LDSSetup` whose ``subsets`` are the *kept* rows, so
``setup.evaluate(scores)`` is the usual LDS (Spearman across models of ``Σ_{kept} scores`` against
the measured outputs, averaged over queries).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.lds_harness import LDSSetup, query_outputs


def train_weighted(setup: LDSSetup, weights: torch.Tensor) -> torch.nn.Module:
    """The full-data run of ``setup`` (same init, batch order and boundaries) with each row's loss
    multiplied by ``weights [n_train]`` and the batch mean's denominator unchanged."""
    recipe = setup.recipe
    model = recipe.make_model()
    model.train()
    opt = recipe.make_optimizer(model.parameters())
    x, y = setup.x_train, setup.y_train
    for _epoch, b in recipe.batches(setup.train_ids):
        opt.zero_grad(set_to_none=True)
        loss = (weights[b] * F.cross_entropy(model(x[b]), y[b], reduction="none")).sum() / len(b)
        loss.backward()
        opt.step()
    return model.eval()


def removal_setup(setup: LDSSetup, fraction: float, n_models: int = 50, seed: int = 0,
                  verbose: bool = False) -> LDSSetup:
    """``setup`` judged on ``n_models`` retrainings with ``round(fraction·n_train)`` random rows
    removed by weight 0 (module docstring), cached under ``setup.path``."""
    n = setup.n_train
    k = max(1, int(round(fraction * n)))
    path = None if setup.path is None else setup.path / f"removal_{fraction:g}_{n_models}_{seed}.npz"
    if path is not None and path.exists():
        a = np.load(path)
        kept, out_m, out_l = a["kept"], a["margin"], a["loss"]
    else:
        rng = np.random.default_rng(10_000 + seed)
        kept = np.ones((n_models, n), dtype=bool)
        out_m, out_l = np.zeros((n_models, setup.n_queries)), np.zeros((n_models, setup.n_queries))
        t0 = time.perf_counter()
        for m in range(n_models):
            kept[m, rng.choice(n, size=k, replace=False)] = False
            model = train_weighted(setup, torch.from_numpy(kept[m].astype(np.float32)))
            out_m[m], out_l[m] = query_outputs(model, setup.x_query, setup.y_query)
        if verbose:
            print(f"  retrained {n_models} models with {k} rows removed ({time.perf_counter() - t0:.1f} s)", flush=True)
        if path is not None:
            np.savez(path, kept=kept, margin=out_m, loss=out_l)
    return dataclasses.replace(setup, subsets=kept, outputs={"margin": out_m, "loss": out_l})


def protocol_check(setup: LDSSetup) -> float:
    """Largest |margin difference| between the weighted loop at ``w = 1`` and the cached full run
    (0 up to rounding: the weighted loop is the full-data run)."""
    model = train_weighted(setup, torch.ones(setup.n_train))
    m, _ = query_outputs(model, setup.x_query, setup.y_query)
    return float(np.abs(m - setup.full_outputs["margin"]).max())


def gap_report(setup: LDSSetup, rec, scores: np.ndarray, fraction: float = 0.01, n_models: int = 50,
               replays: int = 10, samples: tuple[int, ...] = (3, 100, 517)) -> list[str]:
    """Where the gap of ``scores`` (the adjoint's exact derivative) at small removals comes from.

    1. Training noise: float64 exact replays of the recording (``replay_outputs``) for the first
       ``replays`` removal sets of ``fraction``, against the float32 retrainings: Spearman over
       those models, mean over queries (1 = the protocol leaves no noise);
    2. linearization: for a few samples, the replayed change when the sample's weight drops by δ,
       divided by δ, against the scores: relative difference (δ = 1e-3: is it the derivative;
       δ = 1: does it predict the whole sample's removal).
    """
    from inrun_shapley.metrics import spearman
    from inrun_shapley.posthoc.adjoint import replay_outputs

    from benchmarks.lds_harness import loss_fn, margin_fn

    judged = removal_setup(setup, fraction, n_models)
    kept = judged.subsets[:replays].astype(np.float64)
    samples = tuple(i for i in samples if i < setup.n_train)
    fd_rows = []
    for i in samples:
        for delta in (1e-3, 1.0):
            w = np.ones(setup.n_train)
            w[i] -= delta
            fd_rows.append(w)
    weights = np.vstack([np.ones((1, setup.n_train)), kept, np.array(fd_rows).reshape(-1, setup.n_train)])
    t0 = time.perf_counter()
    out, err = replay_outputs(setup.model(), rec, setup.train_set, loss_fn, setup.query_set, margin_fn, weights)
    seconds = time.perf_counter() - t0
    base, rep, fd = out[0], out[1:1 + replays], out[1 + replays:]
    actual = judged.outputs["margin"][:replays]
    q = actual.shape[1]
    agree = np.nanmean([spearman(rep[:, j], actual[:, j]) for j in range(q)])
    pred = kept @ scores
    lin = np.nanmean([spearman(pred[:, j], actual[:, j]) for j in range(q)])
    lines = [f"{len(weights)} float64 replays in {seconds:.1f} s (replay error vs the recording {err:.1e}); at "
             f"{100 * fraction:g}% removed, over {replays} removal sets: Spearman(exact replay, float32 retraining) "
             f"{agree:.3f}, Spearman(scores' prediction, retraining) {lin:.3f}"]
    k = 0
    for i in samples:
        cells = []
        for delta in (1e-3, 1.0):
            change = (base - fd[k]) / delta
            k += 1
            rel = np.linalg.norm(change - scores[i]) / max(np.linalg.norm(scores[i]), 1e-300)
            cells.append(f"δ = {delta:g}: {rel:.3f}")
        lines.append(f"sample {i}: |replayed change/δ − score| / |score| at " + ", ".join(cells))
    return lines


__all__ = ["gap_report", "protocol_check", "removal_setup", "train_weighted"]
