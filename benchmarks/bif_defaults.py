"""BIF at its defaults (issue 27): ``python -m benchmarks.bif_lds --part defaults [--search]``.

Same harness, cache, observable (query margin), scored quantity (``.influence``) and SGLD
minibatches (64 rows, shuffled) as the rest of :mod:`benchmarks.bif_lds`. Three tables, one
process:

1. **search** (``--search``): the posterior itself, ``(nβ, γ)`` over :data:`GRID`, each sampled
   the way :func:`~inrun_shapley.posthoc.bif.choose_config` picks (step size from the curvature,
   burn-in from γ, thinning from the pilot's autocorrelation; no LDS involved) with the diagonal
   control variate and 4×300 draws. The best LDS of the grid is "the best setting found by
   search" (it *is* chosen on LDS: that is its purpose here).
2. **defaults vs tuned**: the defaults before issue 27 (``ε 1e-4, nβ = B/log B, γ 1e3, 4×200,
   burn-in = draws, thin 1, no control variate``), the self-configuring defaults (``BIFConfig()``:
   every sampler setting ``"auto"``, :mod:`inrun_shapley.posthoc.bif.auto`), and the best of the
   search (or, without ``--search``, :data:`RECORDED_BEST`, the best of the recorded search).
3. **against EK-FAC**: kronfluence EK-FAC (``peers.kronfluence_ekfac``) timed in this process,
   then ``BIFConfig(budget_s=k·t_EKFAC)`` for k = 1, 2, 4 (the budget covers the whole call:
   measurements, pilot and sampling).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from benchmarks import lds_harness
from benchmarks.bif_lds import loader_of, run
from inrun_shapley.posthoc.bif import BIFConfig, choose_config

B = 64  # SGLD minibatch rows (loader_of)
DEFAULT_NB = B / math.log(B)
OLD_DEFAULT = BIFConfig(step_size=1e-4, gamma=1e3, draws=200, burn_in=None, thin=1, control_variate=None)
"""``BIFConfig()`` before issue 27 (nβ None = B/log B)."""
GRID = [(DEFAULT_NB, 30.0), (DEFAULT_NB, 100.0), (DEFAULT_NB, 300.0), (DEFAULT_NB, 1000.0), (50.0, 300.0),
        (50.0, 1000.0), (200.0, 1000.0)]
"""``(nβ, γ)`` searched."""
RECORDED_BEST = (DEFAULT_NB, 100.0)
"""The best ``(nβ, γ)`` of the recorded search (benchmarks/RESULTS.md §16)."""


def tuned(setup, n_beta: float, gamma: float, draws: int, pilot: int) -> tuple[BIFConfig, dict]:
    base = BIFConfig(n_beta=n_beta, gamma=gamma, chains=4, draws=draws, control_variate="diagonal")
    return choose_config(setup.model(), lds_harness.loss_fn, loader_of(setup), setup.train_set, setup.query_set,
                         base=base, observable_fn=lds_harness.margin_fn, pilot_draws=pilot)


def row(label: str, res, lds: float, extra: str = "") -> str:
    cfg, d = res.config, res.diagnostics
    return (f"| {label} | {lds:.3f} | {res.seconds:.1f} | ε {cfg.step_size:.3g}, nβ {res.n_beta:.3g}, γ {cfg.gamma:.4g}, "
            f"{cfg.chains}×{cfg.draws}, burn-in {cfg.resolved_burn_in}, thin {cfg.thin}, CV {cfg.control_variate} | "
            f"{d.rhat:.3f} | {d.ess:.0f} |{extra}")


HEAD = ["| setting | LDS | time (s) | settings used | R̂ | ESS |", "|---|---|---|---|---|---|"]


def search(setup, quick: bool) -> tuple[list[str], tuple[float, float], float]:
    rows = list(HEAD)
    best, best_lds = None, -np.inf
    grid = GRID[1:3] if quick else GRID
    for nb, gamma in grid:
        t0 = time.perf_counter()
        cfg, _ = tuned(setup, nb, gamma, 20 if quick else 300, 20 if quick else 100)
        t_choose = time.perf_counter() - t0
        res, lds = run(setup, cfg)
        rows.append(row(f"search nβ {nb:.3g}, γ {gamma:g}", res, lds) + f" (+{t_choose:.1f} s choose_config)")
        print(rows[-1], flush=True)
        if lds > best_lds:
            best, best_lds = (nb, gamma), lds
    return rows, best, best_lds


def ekfac(setup) -> tuple[float, float] | None:
    try:
        from benchmarks import peers

        t0 = time.perf_counter()
        scores = np.asarray(peers.kronfluence_ekfac(setup), dtype=np.float64)
        return setup.evaluate(scores).mean, time.perf_counter() - t0
    except ImportError as exc:
        print(f"kronfluence EK-FAC unavailable ({exc}); budgets below are multiples of 5 s instead", flush=True)
        return None


def main(setup, quick: bool = False, search_grid: bool = False, **kw) -> dict:
    search_grid = kw.pop("search", search_grid)
    out: dict = {}
    if search_grid:
        rows, best, best_lds = search(setup, quick)
        print("\n".join(rows), "\n", flush=True)
        out["search"] = (best, best_lds)
    else:
        best = RECORDED_BEST
    rows = list(HEAD)
    before = dataclasses.replace(OLD_DEFAULT, draws=20, burn_in=20) if quick else OLD_DEFAULT
    res, lds = run(setup, before)
    rows.append(row("defaults before (fixed ε, γ, 4×200, no CV)", res, lds))
    print(rows[-1], flush=True)
    now = BIFConfig(budget_s=3.0) if quick else BIFConfig()
    res, lds = run(setup, now)
    t = res.tuning
    rows.append(row("**defaults now: `BIFConfig()`, every sampler setting auto**", res, lds))
    out["default"] = (lds, res.seconds)
    print(rows[-1], flush=True)
    print(f"  auto: curvature {t['curvature']:.3g}, |w*| {t['weight_norm']:.3g}, d {t['d']}, pilot τ "
          f"{t['tau_steps']:.1f} steps ({t['pilot_seconds']:.1f} s), step {1e3 * t['step_seconds']:.2f} ms, "
          f"draw {1e3 * t['draw_seconds']:.2f} ms", flush=True)
    cfg, _ = tuned(setup, best[0], best[1], 20 if quick else 300, 20 if quick else 100)
    res, lds = run(setup, cfg)
    rows.append(row(f"best of the search (nβ {best[0]:.3g}, γ {best[1]:g}), diagnostics-chosen sampling",
                    res, lds))
    out["tuned"] = (lds, res.seconds)
    print(rows[-1], flush=True)
    print("\n".join(rows), "\n", flush=True)

    ek = ekfac(setup)
    unit = ek[1] if ek is not None else 5.0
    rows = ["| method | LDS | time (s) | BIF settings chosen |", "|---|---|---|---|"]
    if ek is not None:
        rows.append(f"| kronfluence EK-FAC | {ek[0]:.3f} | {ek[1]:.1f} | |")
        out["ekfac"] = ek
    for k in (1,) if quick else (1, 2, 4):
        res, lds = run(setup, BIFConfig(budget_s=k * unit))
        cfg = res.config
        rows.append(f"| BIF, `BIFConfig(budget_s={k}×{unit:.1f})` | {lds:.3f} | {res.seconds:.1f} | "
                    f"γ {cfg.gamma:.4g}, 4×{cfg.draws}, thin {cfg.thin}, CV {cfg.control_variate} |")
        out[f"budget{k}"] = (lds, res.seconds)
        print(rows[-1], flush=True)
    print("\n".join(rows), flush=True)
    return out


__all__ = ["GRID", "OLD_DEFAULT", "RECORDED_BEST", "main"]
