"""Curating a language model's training data with in-run values (In-Run Data Shapley §5.3.1).

The paper trains GPT-2 on a Pile subset, finds ~16% of it with negative value, removes it and
reaches the same test loss in ~25% fewer iterations. Here, on text that ships with Python
(:mod:`benchmarks.common.webtext`: ``pydoc_data.topics`` English plus ``--low-fraction`` of
low-quality documents: repeated boilerplate, near-duplicates, shuffled words, base64 blobs,
garbage, another language), a small byte-level GPT-style model
(:class:`~benchmarks.common.models.TinyTransformerLM`) is trained

1. once with a :class:`~inrun_shapley.ShapleyTracker` (validation: clean held-out English),
   every training sequence labelled with the id of its document; document values are the sums
   of their sequences' values (:func:`inrun_shapley.documents.document_values`);
2. then, per seed (initialization and batch order), from scratch for ``--steps`` steps on:
   all documents; the lowest-valued documents removed, ``x`` = the share with a negative value
   (the paper's rule, ``prune(..., fraction="auto")``) and a sweep (``--fractions``); the same
   number of documents removed by the baselines: ``loss`` (highest mean per-token loss under the
   tracked run's final model: perplexity filtering with a reference model trained on the corpus),
   ``gzip`` (compression ratio farthest from the corpus median, both sides: repetitive and
   incompressible text), ``heuristic`` (share of letters and spaces, share of English stopwords,
   mean word length within 3–10, length), ``random``.

Measured on held-out clean English disjoint from the tracker's validation rows ("test loss",
nats per byte, token-weighted): steps to reach the target (the all-data run's final test loss,
same seed; linear interpolation between evaluations) and the final test loss. Also: the share of
low-quality documents among those each method drops. A plot of test loss vs step is written.

Run:  python -m benchmarks.curation                  # full (3 seeds)
      python -m benchmarks.curation --quick          # smoke test (seconds)
      python -m benchmarks.curation --seeds 0 1 --out a & python -m benchmarks.curation --seeds 2 --out b
      python -m benchmarks.curation --merge a/results.json b/results.json --out ab   # the same, in two processes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import cli
from benchmarks.common.models import TinyTransformerLM, lm_losses
from benchmarks.common.webtext import gzip_score, heuristic_score, make_corpus, to_sequences
from inrun_shapley import ShapleyTracker
from inrun_shapley.documents import document_values, negative_share
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune

METHODS = ("in-run", "loss", "gzip", "heuristic", "random")


@dataclass
class Config:
    n_docs: int = 160
    low_fraction: float = 0.25
    length: int = 64
    d: int = 64
    layers: int = 2
    heads: int = 4
    batch: int = 16
    steps: int = 400
    lr: float = 2e-3
    eval_every: int = 20
    val_rows: int = 32
    test_rows: int = 256
    fractions: tuple = (0.2, 0.3)
    sweep_methods: tuple = ("in-run", "loss", "gzip", "heuristic")
    seeds: tuple = (0, 1, 2)
    data_seed: int = 0
    doc_bytes: tuple = (600, 1600)


@dataclass
class Data:
    docs: list
    low: np.ndarray  # [n_docs] bool
    kind: list
    seqs: torch.Tensor  # [n_seq, length + 1]
    doc_of: np.ndarray  # [n_seq]
    val: torch.Tensor
    test: torch.Tensor


def build_data(cfg: Config) -> Data:
    corpus = make_corpus(cfg.n_docs, cfg.low_fraction, seed=cfg.data_seed, doc_bytes=cfg.doc_bytes)
    seqs, doc_of = to_sequences(corpus.docs, cfg.length)
    g = torch.Generator().manual_seed(cfg.data_seed)
    val = to_sequences(corpus.heldout[0::2], cfg.length)[0]
    test = to_sequences(corpus.heldout[1::2], cfg.length)[0]
    val = val[torch.randperm(len(val), generator=g)[: cfg.val_rows]]
    test = test[torch.randperm(len(test), generator=g)[: cfg.test_rows]]
    return Data(corpus.docs, corpus.low, corpus.kind, seqs, doc_of, val, test)


def token_losses(model, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([m, t] next-byte losses, [m, t] mask of non-pad targets)``; ``lm_losses`` is their per-row mean."""
    logits = model(seqs[:, :-1])
    target = seqs[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=0, reduction="none")
    return tok, (target != 0).to(tok.dtype)


@torch.no_grad()
def test_loss(model, rows: torch.Tensor) -> float:
    """Token-weighted mean loss (nats per byte)."""
    tok, mask = token_losses(model, rows)
    return float((tok * mask).sum() / mask.sum())


def make_model(cfg: Config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyTransformerLM(256, cfg.length, d=cfg.d, heads=cfg.heads, layers=cfg.layers, padding_idx=0)


def batches(keep_seq: np.ndarray, steps: int, batch: int, seed: int):
    """``steps`` batches of ``batch`` sequence ids: epochs of the kept sequences, reshuffled each epoch."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.as_tensor(keep_seq, dtype=torch.int64)
    done = 0
    while done < steps:
        perm = keep[torch.randperm(len(keep), generator=g)]
        for i in range(0, len(perm) - batch + 1, batch):
            yield perm[i:i + batch]
            done += 1
            if done == steps:
                return


def train(cfg: Config, data: Data, keep_docs: np.ndarray, seed: int, sink=None):
    """Train from scratch for ``cfg.steps`` steps on the sequences of ``keep_docs``.

    Returns ``(curve [(step, test loss)], model)``; with ``sink`` (a log writer) the run is
    tracked and the values go there.
    """
    model = make_model(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    tracker = None
    if sink is not None:
        tracker = ShapleyTracker(model, opt, val_data=data.val, val_loss_fn=lm_losses, sink=sink)
    keep_seq = np.flatnonzero(np.isin(data.doc_of, keep_docs))
    curve = [(0, test_loss(model, data.test))]
    for step, ids in enumerate(batches(keep_seq, cfg.steps, cfg.batch, seed), start=1):
        if tracker is not None:
            tracker.begin_batch(ids)
        lm_losses(model, data.seqs[ids]).mean().backward()
        if tracker is not None:
            tracker.after_backward()
            tracker.end_batch()
        opt.step()
        opt.zero_grad()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, test_loss(model, data.test)))
    if tracker is not None:
        tracker.detach()
    return curve, model


# -- rankings (higher = keep) ----------------------------------------------------------------


@torch.no_grad()
def doc_losses(model, data: Data) -> np.ndarray:
    """``[n_docs]`` token-weighted mean loss of each document under ``model``."""
    tot, cnt = np.zeros(len(data.docs)), np.zeros(len(data.docs))
    for i in range(0, len(data.seqs), 256):
        tok, mask = token_losses(model, data.seqs[i:i + 256])
        np.add.at(tot, data.doc_of[i:i + 256], (tok * mask).sum(1).numpy())
        np.add.at(cnt, data.doc_of[i:i + 256], mask.sum(1).numpy())
    return tot / np.maximum(cnt, 1)


def keep_after_drop(score: np.ndarray, n_drop: int) -> np.ndarray:
    """Document ids kept after dropping the ``n_drop`` lowest scores (ties: lower id first)."""
    order = np.lexsort((np.arange(len(score)), score))
    return np.sort(order[n_drop:])


def steps_to(curve, target: float) -> float:
    """First step at which the curve reaches ``target`` (linear interpolation), NaN if never."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return float(s1) if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return math.nan


# -- the benchmark -----------------------------------------------------------------------------


def run(cfg: Config, work: Path, log=print, on_seed=None) -> dict:
    data = build_data(cfg)
    n_docs = len(data.docs)
    all_docs = np.arange(n_docs)
    log(f"{n_docs} documents ({int(data.low.sum())} low-quality), {len(data.seqs)} sequences of "
        f"{cfg.length + 1} bytes; {cfg.steps} steps of {cfg.batch}")
    t0 = time.perf_counter()
    writer = ShapleyLogWriter(work / "curation.shapley")
    _, ref_model = train(cfg, data, all_docs, cfg.data_seed, sink=writer)
    writer.close()
    values = document_values(ShapleyLog.load(work / "curation.shapley"), data.doc_of, n_docs=n_docs)
    log(f"tracked run: {time.perf_counter() - t0:.0f} s")
    if np.isnan(values).any():  # prune() keeps them (no evidence against them)
        log(f"warning: {int(np.isnan(values).sum())} documents never seen by the tracked run; raise --steps")
    auto = negative_share(values)
    keep_auto = prune(values, fraction="auto")  # the user's path: the negative-value rule
    n_auto = n_docs - len(keep_auto)
    scores = {"in-run": values, "loss": -doc_losses(ref_model, data), "gzip": gzip_score(data.docs),
              "heuristic": heuristic_score(data.docs)}
    plans = {("all", 0.0): all_docs}
    for m in METHODS:
        fracs = [auto] + [f for f in cfg.fractions if m in cfg.sweep_methods and abs(f - auto) > 0.005]
        for f in fracs:
            n_drop = n_auto if f == auto else int(round(f * n_docs))
            if m == "random":
                plans[(m, f)] = None  # drawn per seed
            else:
                plans[(m, f)] = keep_auto if (m == "in-run" and f == auto) else keep_after_drop(scores[m], n_drop)
    results = {"config": asdict(cfg), "auto_fraction": auto, "n_docs": n_docs, "runs": {}, "dropped_low": {}}
    for (m, f), keep in plans.items():
        if keep is not None:
            dropped = np.setdiff1d(all_docs, keep)
            results["dropped_low"][f"{m}@{f:.3f}"] = float(data.low[dropped].mean()) if dropped.size else math.nan
    for seed in cfg.seeds:
        for (m, f), keep in plans.items():
            if keep is None:
                n_drop = n_auto if f == auto else int(round(f * n_docs))
                keep = keep_after_drop(np.random.default_rng(seed + 1000).permutation(n_docs).astype(float), n_drop)
            t1 = time.perf_counter()
            curve, _ = train(cfg, data, keep, seed)
            results["runs"].setdefault(f"{m}@{f:.3f}", {})[seed] = curve
            log(f"seed {seed} {m}@{f:.1%}: final {curve[-1][1]:.4f} ({time.perf_counter() - t1:.0f} s)")
        if on_seed is not None:  # partial results after each seed
            on_seed(_finish(results, values, data, t0))
    return _finish(results, values, data, t0)


def _finish(results: dict, values: np.ndarray, data: Data, t0: float) -> dict:
    results["kind_values"] = {k: float(np.mean(values[[i for i, kk in enumerate(data.kind) if kk == k]]))
                              for k in sorted(set(data.kind))}
    results["negative_by_kind"] = {k: float(np.mean(values[[i for i, kk in enumerate(data.kind) if kk == k]] < 0))
                                   for k in sorted(set(data.kind))}
    results["doc_values"], results["doc_kind"] = values.tolist(), list(data.kind)
    results["wall_s"] = time.perf_counter() - t0
    return dict(results)


def summarize(results: dict) -> list[dict]:
    """One row per plan: mean ± std over seeds of steps to target and final loss."""
    runs = results["runs"]
    full = runs["all@0.000"]
    rows = []
    for key, per_seed in runs.items():
        steps, finals = [], []
        for seed, curve in per_seed.items():
            steps.append(steps_to(curve, full[seed][-1][1]))
            finals.append(curve[-1][1])
        rows.append({"plan": key, "steps": steps, "final": finals,
                     "dropped_low": results["dropped_low"].get(key, math.nan)})
    return rows


def table(results: dict) -> str:
    rows = summarize(results)
    base = np.mean(rows[0]["steps"])
    lines = ["| plan (method @ share of documents dropped) | steps to target (mean ± std) | vs all data | "
             "final test loss | low-quality share of dropped |", "|---|---|---|---|---|"]
    for r in rows:
        s = np.array(r["steps"])
        reached = np.isfinite(s)
        steps = (f"{s.mean():.0f} ± {s.std():.0f}" if reached.all()
                 else f"not reached in {int((~reached).sum())}/{len(s)} seeds")
        rel = f"{(s.mean() / base - 1):+.0%}" if reached.all() else "—"
        m, f = r["plan"].split("@")
        name = "all data" if m == "all" else f"{m} @ {float(f):.1%}"
        low = "—" if math.isnan(r["dropped_low"]) else f"{r['dropped_low']:.2f}"
        lines.append(f"| {name} | {steps} | {rel} | {np.mean(r['final']):.4f} ± {np.std(r['final']):.4f} | {low} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = f"{results['auto_fraction']:.3f}"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, per_seed in results["runs"].items():
        if not (key.endswith("@" + auto) or key.startswith("all@")):
            continue
        curves = np.array([[l for _, l in c] for c in per_seed.values()])
        steps = [s for s, _ in next(iter(per_seed.values()))]
        for ax in axes:
            ax.plot(steps, curves.mean(0), label=key.replace("@" + auto, f" @ {float(auto):.1%}").replace("all@0.000", "all data"),
                    lw=2 if key.startswith(("all", "in-run")) else 1)
    half = len(steps) // 3
    axes[1].set_xlim(steps[half], steps[-1])
    lo = min(min(l for _, l in c[half:]) for ps in results["runs"].values() for c in ps.values())
    hi = max(max(l for _, l in c[half:]) for ps in results["runs"].values() for c in ps.values())
    axes[1].set_ylim(lo - 0.02, hi + 0.02)
    for ax, title in zip(axes, ("held-out test loss", "later steps")):
        ax.set_xlabel("step")
        ax.set_ylabel("test loss (nats per byte)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths) -> dict:
    """The ``results.json`` of runs that differ only in their seeds, as one (seeds united)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    out = parts[0]
    for other in parts[1:]:
        same = {k: v for k, v in other["config"].items() if k != "seeds"} == {
            k: v for k, v in out["config"].items() if k != "seeds"}
        if not same or other["doc_values"] != out["doc_values"]:
            raise SystemExit("--merge: the runs differ in more than their seeds (config or tracked values)")
        for key, per_seed in other["runs"].items():
            out["runs"].setdefault(key, {}).update(per_seed)
        out["config"]["seeds"] = sorted(set(out["config"]["seeds"]) | set(other["config"]["seeds"]))
        out["wall_s"] = max(out["wall_s"], other["wall_s"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--n-docs", type=int, default=Config.n_docs)
    ap.add_argument("--low-fraction", type=float, default=Config.low_fraction)
    ap.add_argument("--fractions", type=float, nargs="*", default=list(Config.fractions))
    cli.add_seeds(ap, Config.seeds)
    cli.add_threads(ap)
    cli.add_quick(ap)
    cli.add_out(ap, "folder for results.json and curation.png (default: a temporary folder)")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                    help="no training: unite the results.json of runs that differ only in --seeds, and report")
    args = ap.parse_args(argv)
    cli.set_threads(args.threads)
    cfg = Config(steps=args.steps, n_docs=args.n_docs, low_fraction=args.low_fraction,
                 fractions=tuple(args.fractions), seeds=tuple(args.seeds))
    if args.quick:
        cfg = Config(n_docs=24, steps=12, doc_bytes=(60, 120), eval_every=4, d=16, layers=1, heads=2, length=32, batch=8,
                     val_rows=8, test_rows=16, fractions=(0.3,), sweep_methods=("in-run",), seeds=(0,))
    print("command: " + cli.command_line("curation", argv), flush=True)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="curation_"))
    out.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "curation.png")

    if args.merge:
        results = merge(args.merge)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(cfg, Path(tmp), log=lambda s: print(s, flush=True), on_seed=save)
    save(results)
    print(f"\nnegative-value share (auto fraction): {results['auto_fraction']:.1%} of documents")
    print("mean document value by kind: " + ", ".join(f"{k} {v:+.2f}" for k, v in results["kind_values"].items()))
    print("share negative by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in results["negative_by_kind"].items()))
    print("\n" + table(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'curation.png'} ({results['wall_s']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
