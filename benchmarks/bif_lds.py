"""BIF on the LDS harness: draws per second, variance reduction, settings from diagnostics, LDS vs time.

Run::

    python -m benchmarks.bif_lds                      # full harness (cached), a few minutes
    python -m benchmarks.bif_lds --quick              # smoke run
    python -m benchmarks.bif_lds --plot /tmp/bif_lds.png
    python -m benchmarks.bif_lds --part defaults --search   # issue 27: defaults vs tuned, vs EK-FAC

``--part defaults`` (:mod:`benchmarks.bif_defaults`) prints what the self-configuring defaults
(``BIFConfig()``, every sampler setting ``"auto"``) give against the defaults before them and
against the best setting found by a search over the posterior (nβ, γ), then BIF with a time
budget of 1×, 2× and 4× kronfluence EK-FAC's measured time.

Same harness, cache and observable as ``benchmarks.quality`` (query margin, ``.influence``
scored, SGLD minibatches of 64 from a shuffling DataLoader). Four tables, one process:

1. throughput at the recorded setting (``ours.bif_config``: ε 2e-4, nβ 50, γ 1e3, 4×500, thin 2):
   the sampler as it was (the DataLoader collating row by row, chains one after another), the
   same chains reading the TensorDataset by index, and the C chains vmapped together (all three
   are the same chains: the BIF is compared bit for bit);
2. the control variate (none / prior / diagonal) at that setting;
3. :func:`choose_config` (step size from the curvature, burn-in from γ and R̂, thinning from the
   measured autocorrelation; no LDS involved), then LDS against wall time for 4×D draws at the
   chosen setting, with and without the control variate;
4. kronfluence EK-FAC (``peers.kronfluence_ekfac``) in the same process, for the bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import lds_harness, ours, peers
from benchmarks.common import cli
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence, choose_config


class Collated:
    """The DataLoader as an opaque iterable: the sampler then collates row by row as it used to."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.dataset, self.batch_size = loader, loader.dataset, loader.batch_size

    def __iter__(self):
        return iter(self.loader)


def loader_of(setup) -> DataLoader:
    return DataLoader(TensorDataset(*setup.train_set), batch_size=64, shuffle=True)


def run(setup, cfg: BIFConfig, loader=None):
    """``(result, LDS)`` of one BIF run with the margin observable."""
    res = bayesian_influence(setup.model(), lds_harness.loss_fn, loader if loader is not None else loader_of(setup),
                             setup.train_set, setup.query_set, config=cfg, observable_fn=lds_harness.margin_fn,
                             progress=False)
    return res, setup.evaluate(res.influence.double().numpy()).mean


def throughput(setup, base: BIFConfig) -> list[str]:
    rows = ["| sampler (same chains) | draws/s | sampling (s) | LDS | max abs diff of BIF vs first row |",
            "|---|---|---|---|---|"]
    first = None
    for label, cfg, loader in (
        ("before: DataLoader collated, chains in turn", base, Collated(loader_of(setup))),
        ("chains in turn, TensorDataset read by index", base, None),
        ("chains vmapped together (batched=True)", dataclasses.replace(base, batched=True), None),
    ):
        res, lds = run(setup, cfg, loader)
        first = res.bif if first is None else first
        diff = float((res.bif - first).abs().max())
        rows.append(f"| {label} | {res.draws_per_second:.0f} | {res.sampling_seconds:.1f} | {lds:.3f} | {diff:.1e} |")
        print(rows[-1], flush=True)
    return rows


def control_variates(setup, base: BIFConfig) -> list[str]:
    rows = ["| control variate | LDS | time (s) |", "|---|---|---|"]
    for cv in (None, "prior", "diagonal"):
        res, lds = run(setup, dataclasses.replace(base, control_variate=cv))
        rows.append(f"| {cv or 'none'} | {lds:.3f} | {res.seconds:.1f} |")
        print(rows[-1], flush=True)
    return rows


def curve(setup, chosen: BIFConfig, draws: list[int]) -> tuple[list[str], dict]:
    rows = ["| draws | control variate | LDS | time (s) | R̂ | ESS (traced loss) |", "|---|---|---|---|---|---|"]
    points: dict = {}
    for cv in ("diagonal", None):
        for d in draws:
            res, lds = run(setup, dataclasses.replace(chosen, draws=d, control_variate=cv))
            diag = res.diagnostics
            points.setdefault(cv or "none", []).append((res.seconds, lds))
            rows.append(f"| {chosen.chains}×{d} | {cv or 'none'} | {lds:.3f} | {res.seconds:.1f} | "
                        f"{diag.rhat:.3f} | {diag.ess:.0f} |")
            print(rows[-1], flush=True)
    return rows, points


def ekfac(setup) -> tuple[float, float]:
    t0 = time.perf_counter()
    scores = np.asarray(peers.kronfluence_ekfac(setup), dtype=np.float64)
    seconds = time.perf_counter() - t0
    return setup.evaluate(scores).mean, seconds


def plot(points: dict, ek: tuple[float, float], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, pts in points.items():
        t, lds = zip(*pts)
        ax.plot(t, lds, marker="o", label=f"BIF, control variate: {label}")
    ax.scatter([ek[1]], [ek[0]], marker="*", s=150, color="k", label="kronfluence EK-FAC")
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, 1 CPU thread)")
    ax.set_ylabel("LDS (query margin)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="BIF throughput, variance reduction and LDS-vs-time curve.")
    cli.add_quick(p, help="smoke run: tiny setup and few draws")
    p.add_argument("--draws", default="50,100,200,400", help="draws per chain along the curve")
    p.add_argument("--plot", default=None, help="PNG of LDS vs time")
    p.add_argument("--cache-dir", default=str(lds_harness.DEFAULT_CACHE))
    p.add_argument("--part", choices=["all", "defaults"], default="all",
                   help="all: the issue-17 tables; defaults: defaults vs tuned and vs EK-FAC (issue 27)")
    p.add_argument("--search", action="store_true", help="with --part defaults: run the (nβ, γ) search too")
    cli.add_threads(p)
    args = p.parse_args(argv)
    cli.set_threads(args.threads)
    setup = lds_harness.build_setup(args.cache_dir, quick=args.quick)
    if args.part == "defaults":
        from benchmarks import bif_defaults

        print(f"command: {cli.command_line('bif_lds', argv)}; torch threads {torch.get_num_threads()}")
        bif_defaults.main(setup, quick=args.quick, search=args.search)
        return
    base = ours.bif_config()
    draws = [int(d) for d in args.draws.split(",")]
    if args.quick:
        base = dataclasses.replace(base, draws=20, burn_in=20)
        draws = [10, 20]
    print(f"command: {cli.command_line('bif_lds', argv)}; torch threads {torch.get_num_threads()}")
    print("\n".join(throughput(setup, base)), "\n", flush=True)
    print("\n".join(control_variates(setup, base)), "\n", flush=True)
    chosen, report = choose_config(setup.model(), lds_harness.loss_fn, loader_of(setup), setup.train_set,
                                   setup.query_set, base=base, observable_fn=lds_harness.margin_fn,
                                   pilot_draws=20 if args.quick else 200)
    print("choose_config: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in report.items()), flush=True)
    rows, points = curve(setup, chosen, draws)
    print("\n".join(rows), flush=True)
    ek = ekfac(setup)
    print(f"kronfluence EK-FAC (same process): LDS {ek[0]:.3f}, {ek[1]:.1f} s")
    if args.plot:
        plot(points, ek, args.plot)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
