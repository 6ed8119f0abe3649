"""LDS on a small text LM with uniform vs learned parameter-group weights (issue 7).

The text counterpart of ``benchmarks/weighting_digits.py``. Setup, per seed (everything is
regenerated from the seed: corpus, split, initialization, batch order):

* corpus from :func:`benchmarks.common.textdata.make_corpus` (no download): 160 training sentences
  and 60 extra generated sentences whose facts are not in training (distinct subject–verb–
  object triples);
* model: ``TinyTransformerLM`` from :mod:`benchmarks.common.models` (word level, d=32, 2 heads,
  2 layers), trained with AdamW (lr 3e-3, weight decay 0.01, batch 16, 20 epochs) on the
  per-sentence LM loss (mean next-token cross-entropy over the sentence's tokens, ``lm_losses``);
  every model of one seed starts from the same initialization and uses the same batch-order
  generator;
* reference model trained on all 160 sentences, with 5 checkpoints (end of every 4th epoch) and
  AdamW's preconditioner ``1/(sqrt(v̂)+ε)`` at each (checkpoint weight η_c = lr);
* M models retrained on random α = 0.5 subsets (80 sentences; fixed seeds);
* two LDS query sets of 30 sentences each, and separate fitting sets of the same kinds:
  ``paraphrase``: paraphrases (reorder / synonym / passive / passive+synonym, cycled) of
  training sentences, made with ``textdata.paraphrase``; ``held-out``: the generated sentences
  whose facts are not in training. Fitting sets: 30 other paraphrases (of other training
  sentences) and 30 other held-out sentences. The weights are fitted once per base method on the
  60 fitting queries (both kinds together) and applied to both LDS sets; "learned/LDS-queries"
  fits on the LDS queries themselves (the objective is label-free: it never sees the retrained
  models). Default ``FitConfig`` (8 restarts, lowest objective wins; nothing tuned on LDS).

Signs. Measured query output = the sentence's mean token log-likelihood under the retrained
model (= −LM loss), so higher = the subset helped. Scores are TracIn-style group components
``C_j(i, q) = Σ_c η_c ⟨∇ℓ_q, P_c ⊙ ∇ℓ_i⟩`` with ``ℓ`` the LM loss for both the training sample
and the query: positive = a gradient step on sentence ``i`` lowers the query's LM loss = raises
its mean log-likelihood, the same orientation as the LDS outputs (no sign flip needed).

Groups (``--groups type``, default): by module type, pooled over the two layers: ``embed``
(token + position embeddings), ``attn_q``, ``attn_k``, ``attn_v``, ``attn_o``, ``mlp`` (fc1+fc2),
``norm`` (all LayerNorms), ``head``. ``--groups tensor``: one group per parameter tensor.

Run:  python -m benchmarks.weighting_text [--seeds 0 1 2] [--models 50] [--groups type|tensor]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import cli
from benchmarks.common.models import TinyTransformerLM, lm_losses
from benchmarks.common.textdata import QUERY_KINDS, WordTokenizer, make_corpus, paraphrase
from benchmarks.weighting_digits import fit_on_both_query_sets, print_seed_results
from inrun_shapley.metrics import linear_datamodeling_score
from inrun_shapley.posthoc.weighting import (
    GroupWeights,
    ParameterGroups,
    adam_preconditioner,
    compute_group_components,
    reweigh,
)

N_TRAIN, N_Q = 160, 30  # training sentences; sentences per query set (LDS and fitting, each kind)
EPOCHS, BATCH, LR, WD, CKPT_EVERY = 20, 16, 3e-3, 0.01, 4
TYPE_PATTERNS = {
    r"^(tok|pos)\.": "embed",
    r"\.q\.": "attn_q",
    r"\.k\.": "attn_k",
    r"\.v\.": "attn_v",
    r"\.o\.": "attn_o",
    r"\.fc[12]\.": "mlp",
    r"(^|\.)ln(1|2|_f)\.": "norm",
    r"^head\.": "head",
}


def seq_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the row's mean next-token cross-entropy over non-pad targets.

    Same value as ``benchmarks.common.models.lm_losses`` per row, written with gather + mask so it is
    ``torch.func.vmap``-safe. ``logits [b, t, V]``, ``target [b, t]``.
    """
    logp = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    mask = (target != 0).to(logp.dtype)
    return -((logp * mask).sum(-1) / mask.sum(-1)).sum()


def make_data(seed: int):
    """Training ids, LDS and fitting query sentences (paraphrase / held-out), tokenizer."""
    corpus = make_corpus(N_TRAIN + 2 * N_Q, 1, seed=seed)
    facts, sentences = corpus.facts, corpus.sentences
    train = sentences[:N_TRAIN]
    held = sentences[N_TRAIN:]
    rng = np.random.default_rng(seed)
    src = rng.choice(N_TRAIN, 2 * N_Q, replace=False)
    para = [paraphrase(facts[s], QUERY_KINDS[k % len(QUERY_KINDS)]) for k, s in enumerate(src)]
    sets = {
        "lds": {"paraphrase": para[:N_Q], "held-out": held[:N_Q]},
        "fit": {"paraphrase": para[N_Q:], "held-out": held[N_Q:]},
    }
    tok = WordTokenizer({w for s in sentences + para for w in s.split()})
    length = max(len(tok.encode(s)) for s in sentences + para)
    enc = lambda ss: tok.encode_batch(ss, length)  # noqa: E731
    return enc(train), {k: {kk: enc(v) for kk, v in d.items()} for k, d in sets.items()}, tok, length


def train_lm(seqs: torch.Tensor, vocab: int, length: int, seed: int, record: bool = False):
    """Train one LM; with ``record`` also return checkpoints and AdamW preconditioners."""
    torch.manual_seed(seed)
    model = TinyTransformerLM(vocab, length, padding_idx=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    gen = torch.Generator().manual_seed(seed + 1)
    ckpts, preconds = [], []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(seqs), generator=gen)
        for s in range(0, len(seqs), BATCH):
            opt.zero_grad()
            lm_losses(model, seqs[order[s : s + BATCH]]).mean().backward()
            opt.step()
        if record and (epoch + 1) % CKPT_EVERY == 0:
            ckpts.append({n: p.detach().clone() for n, p in model.named_parameters()})
            preconds.append(adam_preconditioner(opt, model))
    return (model, ckpts, preconds) if record else model


def loglik(model, seqs: torch.Tensor) -> np.ndarray:
    """Mean token log-likelihood of each row (= −LM loss), ``[n]``."""
    with torch.no_grad():
        return (-lm_losses(model, seqs)).numpy()


def xy(seqs: torch.Tensor):
    return seqs[:, :-1], seqs[:, 1:]


def run_seed(seed: int, n_models: int, group_kind: str):
    train, qsets, tok, length = make_data(seed)
    lds_q, fit_q = qsets["lds"], qsets["fit"]
    vocab = len(tok)
    rng = np.random.default_rng(10_000 + seed)
    init_seed = 1000 * seed

    t0 = time.perf_counter()
    subsets = np.zeros((n_models, N_TRAIN), dtype=bool)
    outputs = {kind: np.zeros((n_models, N_Q)) for kind in lds_q}
    for m in range(n_models):
        subsets[m, rng.choice(N_TRAIN, N_TRAIN // 2, replace=False)] = True
        model = train_lm(train[torch.from_numpy(np.flatnonzero(subsets[m]))], vocab, length, init_seed)
        for kind, q in lds_q.items():
            outputs[kind][m] = loglik(model, q)
    t_retrain = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref, ckpts, preconds = train_lm(train, vocab, length, init_seed, record=True)
    t_ref = time.perf_counter() - t0
    info = {
        "params": sum(p.numel() for p in ref.parameters()),
        "vocab": vocab,
        "length": length,
        "t_ref": t_ref,
        "loss": {"train": -loglik(ref, train).mean(), **{k: -loglik(ref, q).mean() for k, q in lds_q.items()}},
    }
    if group_kind == "type":
        groups = ParameterGroups.by_pattern(ref, TYPE_PATTERNS)
    else:
        groups = ParameterGroups.per_tensor(ref)
    kinds = list(lds_q)
    q_lds = torch.cat([lds_q[k] for k in kinds])
    q_fit = torch.cat([fit_q[k] for k in kinds])
    cols = {k: np.arange(j * N_Q, (j + 1) * N_Q) for j, k in enumerate(kinds)}

    results, timings, learned = {}, {}, {}
    for base, pc in (("grad_dot", None), ("grad_dot+adam", preconds)):
        common = dict(checkpoints=ckpts, lrs=[LR] * len(ckpts), preconditioner=pc, batch_size=N_TRAIN)
        comps_lds, w_fit, w_self, labelled, timings[base] = fit_on_both_query_sets(
            lambda queries: compute_group_components(ref, seq_loss, xy(train), xy(queries), groups, **common),
            q_lds, q_fit, base, seed,
        )
        learned[base] = w_fit
        results[(base, "", "weights fitted on LDS queries")] = w_self
        for label, w in labelled:
            scores = reweigh(comps_lds, w)
            for kind in kinds:
                results[(base, kind, label)] = linear_datamodeling_score(
                    scores[:, cols[kind]], subsets, outputs[kind]
                )
        results[(base, "", "objective uniform->fitted")] = (
            w_fit.fit_info["uniform_objective"], w_fit.objective_trace.min()
        )
        share = np.abs(comps_lds.values).sum(axis=(1, 2))
        results[(base, "", "|C_j| share (LDS queries)")] = GroupWeights(
            comps_lds.group_names, share / share.sum() * len(share)
        )
    return results, learned, t_retrain, timings, info, groups


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_seeds(parser, [0, 1, 2])
    parser.add_argument("--models", type=int, default=50, help="retrained subset models per seed")
    parser.add_argument("--groups", choices=["type", "tensor"], default="type")
    cli.add_threads(parser)
    args = parser.parse_args(argv)
    cli.set_threads(args.threads)
    t_start = time.perf_counter()
    print("command: " + cli.command_line("weighting_text", argv))

    table: dict = {}
    for n_seed, seed in enumerate(args.seeds):
        results, learned, t_retrain, timings, info, groups = run_seed(seed, args.models, args.groups)
        if n_seed == 0:
            print(f"setup: {N_TRAIN} training sentences, LDS queries {N_Q} paraphrase + {N_Q} held-out, "
                  f"fit queries {N_Q} + {N_Q}; TinyTransformerLM {info['params']} params, vocab {info['vocab']}, "
                  f"length {info['length']}; AdamW lr {LR} wd {WD}, batch {BATCH}, {EPOCHS} epochs, "
                  f"{EPOCHS // CKPT_EVERY} checkpoints; {torch.get_num_threads()} thread(s)")
            print(f"groups ({args.groups}): " + "; ".join(f"{g}: {len(ms)} tensors" for g, ms in groups.members.items()))
        print(f"\n=== seed {seed}: {args.models} retrained models in {t_retrain:.1f}s "
              f"(reference run {info['t_ref']:.2f}s); reference LM loss "
              + ", ".join(f"{k} {v:.3f}" for k, v in info["loss"].items()))
        for base, (tc, tf) in timings.items():
            print(f"{base}: components {tc:.2f}s (fit + LDS queries), one fit {tf:.2f}s")
            if n_seed == 0:
                print(learned[base].table())
        print_seed_results(results, table, lambda key: f"{key[0]:<14} {key[1]:<10} {key[2]:<28}")

    print(f"\n=== LDS, mean ± std over seeds {args.seeds} (M={args.models}, {args.groups} groups; "
          f"per seed after the ±)")
    for (base, kind, label), vals in table.items():
        print(f"  {base:<14} {kind:<10} {label:<22} {np.mean(vals):.4f} ± {np.std(vals):.4f}   "
              + " ".join(f"{v:.4f}" for v in vals))
    print(f"total wall time {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
