"""Source identification on a generated text corpus: which training sentence taught the fact?

A small word-level transformer LM (attention written with ``nn.Linear`` projections, so every
parameterized layer, Embedding, Linear and LayerNorm, has a dedicated capture rule) is trained
with AdamW on the templated facts of :mod:`benchmarks.common.textdata`. Two per-query trackers watch
the same run side by side: ``shapley`` (Adam-aware fixed-state values) and ``sgd`` (SGD-form:
lr × gradient dot product). The queries are paraphrases of particular training sentences; a
query's loss is the paraphrase's LM loss (mean over its tokens), so a training sentence's value
for the query is how much it lowered that loss over the run.

For each query, the training sentences are ranked by value (highest first) and the rank of the
paraphrased source sentence is recorded: mean rank, recall@1, recall@10. Lexical baselines
score the same pairs without any model: Jaccard overlap of the word sets and TF-IDF cosine.
Also printed: the query path each tracked layer took (``query_path="auto"``).

Run:  python -m benchmarks.text_source_id            # full (≈ a few minutes on 1 thread)
      python -m benchmarks.text_source_id --quick    # smoke test
Options: --sentences N, --queries N, --epochs N, --batch N, --seed N, --threads N,
         --query-path auto|exact|ghost.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter

import numpy as np
import torch

from benchmarks.common import cli
from benchmarks.common.models import TinyTransformerLM, lm_losses
from benchmarks.common.textdata import QUERY_KINDS, make_corpus
from inrun_shapley import ShapleyTracker


def jaccard(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / len(x | y)


def tfidf_matrix(queries, sentences) -> np.ndarray:
    """``[n_sentences, n_queries]`` TF-IDF cosine (idf from the training sentences)."""
    docs = [Counter(s.split()) for s in sentences]
    df = Counter(w for d in docs for w in d)
    n = len(docs)
    idf = lambda w: math.log((1 + n) / (1 + df.get(w, 0))) + 1.0  # noqa: E731

    def vec(counter):
        v = {w: c * idf(w) for w, c in counter.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    dv = [vec(d) for d in docs]
    qv = [vec(Counter(q.split())) for q in queries]
    return np.array([[sum(x * d.get(w, 0.0) for w, x in q.items()) for q in qv] for d in dv])


def source_ranks(scores: np.ndarray, sources) -> np.ndarray:
    """Rank (1 = top) of each query's source among all training rows; ties count pessimistically."""
    ranks = []
    for q, src in enumerate(sources):
        col = scores[:, q]
        ranks.append(int((col > col[src]).sum() + (col == col[src]).sum()))
    return np.array(ranks)


def summarize(ranks: np.ndarray) -> tuple[float, float, float]:
    return float(ranks.mean()), float((ranks <= 1).mean()), float((ranks <= 10).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    cli.add_seed(ap)
    cli.add_threads(ap)
    ap.add_argument("--query-path", default="auto", choices=["auto", "exact", "ghost"])
    cli.add_quick(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sentences, args.queries, args.epochs = 60, 12, 3
    cli.set_threads(args.threads)
    torch.manual_seed(args.seed)

    corpus = make_corpus(args.sentences, args.queries, seed=args.seed)
    tok = corpus.tokenizer
    length = max(len(tok.encode(s)) for s in corpus.sentences + corpus.queries)
    train = tok.encode_batch(corpus.sentences, length)
    queries = tok.encode_batch(corpus.queries, length)
    model = TinyTransformerLM(len(tok), length, padding_idx=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    trackers = {
        est: ShapleyTracker(model, opt, val_data=queries, val_loss_fn=lm_losses, estimator=est,
                            per_query=True, query_path=args.query_path, record_steps=False)
        for est in ("shapley", "sgd")
    }
    n = len(train)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, args.batch):
            ids = order[start:start + args.batch]
            for tr in trackers.values():
                tr.begin_batch(ids)
            loss = lm_losses(model, train[ids]).mean()
            loss.backward()
            for tr in trackers.values():
                tr.after_backward()
                tr.end_batch()
            opt.step()
            opt.zero_grad()
            steps += 1
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        final_train = float(lm_losses(model, train).mean())
        final_query = float(lm_losses(model, queries).mean())

    scores = {name: tr.values[:n] for name, tr in trackers.items()}
    scores["jaccard"] = np.array([[jaccard(q, s) for q in corpus.queries] for s in corpus.sentences])
    scores["tfidf"] = tfidf_matrix(corpus.queries, corpus.sentences)
    src = corpus.query_source
    kinds = np.array(corpus.query_kind)

    print("command: " + cli.command_line("text_source_id", argv))
    print(f"corpus: {n} training sentences, {len(corpus.queries)} paraphrase queries, vocab {len(tok)}, "
          f"length {length}; model {sum(p.numel() for p in model.parameters())} params, AdamW lr {args.lr}, "
          f"batch {args.batch}, {args.epochs} epochs = {steps} steps, {args.threads} thread(s)")
    print(f"training with both trackers: {train_s:.1f} s; final LM loss train {final_train:.3f}, "
          f"queries {final_query:.3f}")
    for name, tr in trackers.items():
        ghost = [r.module for r in tr.query_plan if r.path == "ghost"]
        print(f"query path ({name}, query_path={args.query_path!r}): {len(ghost)} of {len(tr.query_plan)} tracked "
              f"layers on the ghost path" + (f" ({', '.join(ghost)})" if ghost else ""))
    print()
    header = f"{'scores':<10} {'mean rank':>10} {'recall@1':>9} {'recall@10':>10}   " + "  ".join(
        f"R@1 {k}" for k in QUERY_KINDS)
    print(header)
    print("-" * len(header))
    for name, s in scores.items():
        ranks = source_ranks(s, src)
        mean_rank, r1, r10 = summarize(ranks)
        per_kind = "  ".join(f"{(ranks[kinds == k] <= 1).mean():>{4 + len(k)}.2f}" for k in QUERY_KINDS)
        print(f"{name:<10} {mean_rank:>10.1f} {r1:>9.2f} {r10:>10.2f}   {per_kind}")
    print(f"(rank among {n} training sentences; 1 = top; random ranking: mean rank {(n + 1) / 2:.1f}, "
          f"recall@10 {10 / n:.2f})")
    for tr in trackers.values():
        tr.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
