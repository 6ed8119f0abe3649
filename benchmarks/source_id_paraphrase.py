"""Source identification of rephrased sentences: which training sentence taught the model this?

Two settings (``--corpus``), each over several seeds:

* ``disjoint`` (:func:`benchmarks.common.textdata.make_disjoint_corpus`): a query restates one
  training sentence's fact with the *other* surface form of every content word ("bob fixed the
  big vessel in the port" for "robert repaired the large boat in the harbor"), so it shares no
  content word with its source; both forms of every word are used interchangeably across the
  corpus, so the model can learn the synonyms from the training data. Lexical methods are blind
  here (they favour sentences that share one query word, which the source never does).
* ``templated`` (:func:`benchmarks.common.textdata.make_corpus`, the corpus of
  ``benchmarks.text_source_id``): paraphrases that keep names and objects (reorder, synonym,
  passive); lexical overlap finds the source trivially.

One run of the small word-level transformer LM (AdamW) per seed feeds every model-based method:

* in-run per-query values, one tracker per estimator (``--estimators``; ``midpoint`` is the
  library default where it exists, ``shapley`` the fixed-state Adam-aware values, ``sgd`` the
  SGD form lr·⟨g_i, g_q⟩), each read under several per-step normalizations (``--normalizations``:
  ``none`` raw sums, ``step_std``, ``loss_change``, ``step_z``; docs in
  :mod:`inrun_shapley.log.moments`);
* the adjoint pass (:func:`inrun_shapley.adjoint_influence`, ``loo`` Jacobian, default damping)
  on a recording of the same run;
* TracIn: Σ over the end-of-epoch checkpoints of lr · ⟨∇ℓ_i, ∇ℓ_q⟩ (per-sample gradients by
  ``torch.func``);
* EK-FAC (kronfluence, when installed; its Linear layers only, embeddings are not supported by it);
* lexical: BM25, TF-IDF cosine and Jaccard overlap (no model).

The query loss is the paraphrase's LM loss, mean over its tokens (``templated``), or on
``disjoint`` its *fact* loss: the same, except that each content word's target probability is
that of either surface form (``−log(p(bob) + p(robert))``), the model's belief in the fact
whatever the wording. Measured on seed 0 (TracIn, 15 epochs): the plain LM loss of a
word-disjoint paraphrase is *not* lowered by its source (a tiny LM memorizes the surface forms it
saw; source mean rank 149–161 of 240, worse than chance), while the fact loss is (recall@1 1.0).
A training sentence's score for a query is how much it lowered (helped) that loss. For each query the training sentences are
ranked by score and the source's rank is recorded (ties: the expected rank under random
tie-breaking, so a method that cannot tell sentences apart scores chance). Reported: recall@1,
recall@10 and mean rank, mean ± std over seeds.

Run:  python -m benchmarks.source_id_paraphrase --corpus disjoint   # ≈ 5 min on 1 loaded core
      python -m benchmarks.source_id_paraphrase                 # both corpora, seeds 0 1 2 (≈ 10 min)
      python -m benchmarks.source_id_paraphrase --quick         # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from benchmarks.common import cli
from benchmarks.common.models import TinyTransformerLM, lm_losses
from benchmarks.common.textdata import TextCorpus, make_corpus, make_disjoint_corpus, synonym_ids
from inrun_shapley import ShapleyTracker
from inrun_shapley.errors import AttributionError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter

DEFAULT_ESTIMATORS = ("midpoint", "shapley", "sgd")
NORMALIZATIONS = ("none", "step_std", "loss_change", "step_z")
PEERS = ("adjoint", "tracin", "ekfac", "bm25", "tfidf", "jaccard")


# ---------------------------------------------------------------------------------- lexical
def jaccard_matrix(queries, sentences) -> np.ndarray:
    """``[n_sentences, n_queries]`` Jaccard overlap of the word sets."""
    qs = [set(q.split()) for q in queries]
    return np.array([[len(set(s.split()) & q) / len(set(s.split()) | q) for q in qs] for s in sentences])


def tfidf_matrix(queries, sentences) -> np.ndarray:
    """``[n_sentences, n_queries]`` TF-IDF cosine (idf from the training sentences)."""
    docs = [Counter(s.split()) for s in sentences]
    df = Counter(w for d in docs for w in d)
    n = len(docs)

    def vec(counter):
        v = {w: c * (math.log((1 + n) / (1 + df.get(w, 0))) + 1.0) for w, c in counter.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    dv, qv = [vec(d) for d in docs], [vec(Counter(q.split())) for q in queries]
    return np.array([[sum(x * d.get(w, 0.0) for w, x in q.items()) for q in qv] for d in dv])


def bm25_matrix(queries, sentences, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """``[n_sentences, n_queries]`` Okapi BM25 of each sentence for each query (Lucene idf)."""
    docs = [Counter(s.split()) for s in sentences]
    lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
    df = Counter(w for d in docs for w in d)
    n, avg = len(docs), lengths.mean()
    idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
    out = np.zeros((n, len(queries)))
    for j, q in enumerate(queries):
        for i, d in enumerate(docs):
            norm = k1 * (1 - b + b * lengths[i] / avg)
            out[i, j] = sum(idf.get(w, 0.0) * d[w] * (k1 + 1) / (d[w] + norm) for w in q.split() if w in d)
    return out


def fact_losses_fn(alt: torch.Tensor):
    """``fn(model, seqs) -> [m]``: like :func:`lm_losses`, with each target's probability that of
    either of its surface forms (``alt[id]``: the other form's id, or ``id``)."""

    def fact_losses(model, seqs):
        logp = model(seqs[:, :-1]).log_softmax(-1)
        target = seqs[:, 1:]
        own = logp.gather(-1, target[..., None])[..., 0]
        other = logp.gather(-1, alt[target][..., None])[..., 0]
        both = torch.where(alt[target] != target, torch.logaddexp(own, other), own)
        mask = (target != 0).to(logp.dtype)
        return -(both * mask).sum(1) / mask.sum(1)

    return fact_losses


# ---------------------------------------------------------------------------------- ranking
def source_ranks(scores: np.ndarray, sources) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the source's expected rank and P(rank ≤ 1), P(rank ≤ 10) under random tie-breaking.

    Args:
        scores: ``[n_sentences, n_queries]``, higher = more helpful.
        sources: the source sentence id of each query.
    """
    ranks, r1, r10 = [], [], []
    for q, src in enumerate(sources):
        col = scores[:, q]
        above, tied = int((col > col[src]).sum()), int((col == col[src]).sum())
        ranks.append(above + (tied + 1) / 2)
        r1.append(float(np.clip((1 - above) / tied, 0, 1)))
        r10.append(float(np.clip((10 - above) / tied, 0, 1)))
    return np.array(ranks), np.array(r1), np.array(r10)


# ---------------------------------------------------------------------------------- peers
def tracin_scores(model, checkpoints, lrs, train, queries, query_loss=lm_losses) -> np.ndarray:
    """``[n, Q]`` Σ_c lr_c · ⟨∇ℓ_i(θ_c), ∇f_q(θ_c)⟩ (per-sample gradients by torch.func; ℓ the LM
    loss, f the query loss)."""

    def flat_grads(params, rows, loss=lm_losses):
        def one(p, row):
            g = grad(lambda pp: loss(lambda x: functional_call(model, pp, (x,)), row[None])[0])(p)
            return torch.cat([v.reshape(-1) for v in g.values()])

        return vmap(one, in_dims=(None, 0))(params, rows)

    out = 0.0
    for state, lr in zip(checkpoints, lrs):
        params = {k: v.detach() for k, v in state.items()}
        out = out + lr * (flat_grads(params, train) @ flat_grads(params, queries, query_loss).T)
    return np.asarray(out, dtype=np.float64)


def ekfac_scores(model, train, queries, query_loss=lm_losses) -> np.ndarray:
    """``[n, Q]`` kronfluence EK-FAC pairwise scores with the query LM loss as measurement
    (positive = the training row lowers the query's loss)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            (seqs,) = batch
            logits = model(seqs[:, :-1])
            target = seqs[:, 1:]
            if sample:
                with torch.no_grad():
                    probs = logits.detach().softmax(-1)
                    target = torch.where(target != 0, torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                                         .reshape(target.shape), target)
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=0, reduction="sum")

        def compute_measurement(self, batch, model):
            (seqs,) = batch
            return query_loss(model, seqs).sum()

        def get_attention_mask(self, batch):
            return None

    task = LMTask()
    wrapped = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("src", wrapped, task, cpu=True, disable_tqdm=True, disable_model_save=True, output_dir=out)
        analyzer.fit_all_factors("f", dataset=TensorDataset(train), per_device_batch_size=len(train),
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("s", "f", query_dataset=TensorDataset(queries),
                                         train_dataset=TensorDataset(train),
                                         per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=len(train), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"]  # [Q, n]
    return np.asarray(scores.T, dtype=np.float64)


# ---------------------------------------------------------------------------------- one run
def build_corpus(kind: str, n_sentences: int, n_queries: int, seed: int) -> TextCorpus:
    if kind == "disjoint":
        return make_disjoint_corpus(n_sentences, n_queries, seed=seed)
    return make_corpus(n_sentences, n_queries, seed=seed)


def run_seed(args, corpus_kind: str, seed: int, estimators, peers, work: Path) -> tuple[dict, dict]:
    """Train once with every tracker and recorder; return ``{method: [n, Q] scores}`` and run info."""
    from inrun_shapley import adjoint_influence
    from inrun_shapley.trajectory import TrajectoryRecorder

    torch.manual_seed(seed)
    corpus = build_corpus(corpus_kind, args.sentences, args.queries, seed)
    tok = corpus.tokenizer
    length = max(len(tok.encode(s)) for s in corpus.sentences + corpus.queries)
    train, queries = tok.encode_batch(corpus.sentences, length), tok.encode_batch(corpus.queries, length)
    n = len(train)
    query_loss = fact_losses_fn(synonym_ids(tok)) if corpus_kind == "disjoint" else lm_losses
    model = TinyTransformerLM(len(tok), length, d=args.width, padding_idx=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    trackers, info = {}, {"errors": {}}
    for est in estimators:
        try:
            writer = ShapleyLogWriter(work / f"log_{corpus_kind}_{seed}_{est}", n_queries=len(queries),
                                      record_steps=True)
            trackers[est] = (ShapleyTracker(model, opt, val_data=queries, val_loss_fn=query_loss, estimator=est,
                                            per_query=True, record_steps=False, sink=writer), writer)
        except (AttributionError, ValueError) as exc:
            info["errors"][est] = f"{type(exc).__name__}: {exc}"
    recorder = None
    if "adjoint" in peers and trackers:
        recorder = TrajectoryRecorder(work / f"traj_{corpus_kind}_{seed}")
        next(iter(trackers.values()))[0].add_step_listener(recorder)
    checkpoints, lrs = [], []
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for ids in torch.randperm(n, generator=gen).split(args.batch):
            for tr, _w in trackers.values():
                tr.begin_batch(ids)
            lm_losses(model, train[ids]).mean().backward()
            for tr, _w in trackers.values():
                tr.after_backward()
                tr.end_batch()
            opt.step()
            opt.zero_grad()
        checkpoints.append({k: v.detach().clone() for k, v in model.named_parameters()})
        lrs.append(args.lr)
    info["train_s"] = time.perf_counter() - t0
    for tr, w in trackers.values():
        tr.detach()
        w.close()
    with torch.no_grad():
        info["loss_train"] = float(lm_losses(model, train).mean())
        info["loss_query"] = float(query_loss(model, queries).mean())
    info.update(n=n, q=len(queries), vocab=len(tok), length=length,
                params=sum(p.numel() for p in model.parameters()), steps=args.epochs * math.ceil(n / args.batch))

    scores: dict[str, np.ndarray] = {}
    for est in trackers:
        log = ShapleyLog.load(work / f"log_{corpus_kind}_{seed}_{est}")
        for norm in args.normalizations:
            scores[f"{est}/{norm}"] = log.helpfulness(norm, ids=np.arange(n))
    timed = {}
    if recorder is not None:
        recorder.close()
        t = time.perf_counter()
        try:  # output = query LM loss: a positive score means the row raised the loss (harmful)
            adj = adjoint_influence(model, recorder.path, train, lambda m, b: lm_losses(m, b),
                                    queries, query_loss, progress=False,
                                    jacobian="loo")  # as recorded (the default before issue 27)
            scores["adjoint"] = -adj[:n]
        except (AttributionError, RuntimeError) as exc:
            info["errors"]["adjoint"] = f"{type(exc).__name__}: {exc}"
        timed["adjoint"] = time.perf_counter() - t
    if "tracin" in peers:
        t = time.perf_counter()
        scores["tracin"] = tracin_scores(model, checkpoints, lrs, train, queries, query_loss)
        timed["tracin"] = time.perf_counter() - t
    if "ekfac" in peers:
        t = time.perf_counter()
        try:
            scores["ekfac"] = ekfac_scores(model, train, queries, query_loss)
        except Exception as exc:  # noqa: BLE001 - a peer's failure is reported, not fatal
            info["errors"]["ekfac"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        timed["ekfac"] = time.perf_counter() - t
    lexical = {"bm25": bm25_matrix, "tfidf": tfidf_matrix, "jaccard": jaccard_matrix}
    for name, fn in lexical.items():
        if name in peers:
            scores[name] = fn(corpus.queries, corpus.sentences)
    info["peer_s"] = timed
    results = {name: source_ranks(s, corpus.query_source) for name, s in scores.items()}
    return results, info


def fmt(xs, digits: int = 2) -> str:
    xs = np.asarray(xs, dtype=float)
    return f"{xs.mean():.{digits}f} ± {xs.std():.{digits}f}" if len(xs) > 1 else f"{xs.mean():.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", nargs="+", default=["disjoint", "templated"], choices=["disjoint", "templated"])
    ap.add_argument("--sentences", type=int, default=240)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=32, help="model width d (default 32)")
    ap.add_argument("--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS),
                    help="tracker estimators; unknown ones are reported and skipped (default %(default)s)")
    ap.add_argument("--normalizations", nargs="+", default=list(NORMALIZATIONS), choices=NORMALIZATIONS)
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    cli.add_seeds(ap, (0, 1, 2))
    cli.add_threads(ap)
    cli.add_quick(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sentences, args.queries, args.epochs, args.seeds = 60, 8, 2, args.seeds[:1]
        args.peers = [p for p in args.peers if p != "ekfac"]
    cli.set_threads(args.threads)
    print("command: " + cli.command_line("source_id_paraphrase", argv))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.corpus:
            per_seed, infos = {}, []
            for seed in args.seeds:
                res, info = run_seed(args, kind, seed, args.estimators, args.peers, Path(tmp))
                infos.append(info)
                for name, r in res.items():
                    per_seed.setdefault(name, []).append(r)
            i0 = infos[0]
            print(f"\n[{kind}] {i0['n']} training sentences, {i0['q']} queries, vocab {i0['vocab']}, length "
                  f"{i0['length']}; LM {i0['params']} params (d {args.width}), AdamW lr {args.lr}, batch {args.batch}, "
                  f"{args.epochs} epochs = {i0['steps']} steps; seeds {' '.join(map(str, args.seeds))}")
            print(f"  final LM loss train {fmt([i['loss_train'] for i in infos])}, queries "
                  f"{fmt([i['loss_query'] for i in infos])} ({'fact' if kind == 'disjoint' else 'LM'} loss); training with trackers "
                  f"{fmt([i['train_s'] for i in infos], 1)} s; peers (s): " + ", ".join(
                      f"{k} {fmt([i['peer_s'].get(k, 0) for i in infos], 1)}" for k in i0["peer_s"]))
            for name, err in sorted({k: v for i in infos for k, v in i["errors"].items()}.items()):
                print(f"  NOT RUN {name}: {err}")
            header = f"  {'method':<22} {'recall@1':>13} {'recall@10':>13} {'mean rank':>15}"
            print(header + "\n  " + "-" * (len(header) - 2))
            for name, runs in per_seed.items():
                r1 = [r[1].mean() for r in runs]
                r10 = [r[2].mean() for r in runs]
                mr = [r[0].mean() for r in runs]
                print(f"  {name:<22} {fmt(r1):>13} {fmt(r10):>13} {fmt(mr, 1):>15}")
            n = i0["n"]
            print(f"  (rank among {n} sentences, 1 = top; chance: recall@1 {1 / n:.3f}, recall@10 {10 / n:.3f}, "
                  f"mean rank {(n + 1) / 2:.1f}; mean ± std over seeds)")
    print(f"\n{time.perf_counter() - start:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
