"""Per-token attribution on a translation task: is a French output word traced to its English source?

The Bayesian Influence Function paper (Kreer et al., arXiv 2509.26544) traces single tokens of a
language model's output to single tokens of its training data (the word "She" in an output to
"elle" in the training text). This benchmark asks that question where the answer is known:

* **corpus** (:mod:`benchmarks.common.bilingual`): 300 training sequences
  ``<english> = <french>`` over a 46-word-per-language dictionary and two templates that reorder
  words; 16 held-out query sequences whose word combinations never occur in training;
* **model**: :class:`~benchmarks.common.models.TinyTransformerLM` (2 layers, width 32), AdamW,
  300 steps of batch 32, 1 torch thread; it translates the held-out queries;
* **query tokens**: the four French *content* words of each query (noun, adjective, verb, noun;
  the articles ``le``/``un`` are left out: their translations occur in every sequence). The
  observable of a query token is its own next-token loss (``φ = −log p(word | prefix)``);
* **training tokens**: every (training sequence, prediction position) pair, 300 × 12 = 3,600 rows.
  The loss of row (i, p) is the next-token loss of token ``p + 1`` of sequence i, so a training
  token *is the word it predicts* (the target), English half or French half.

Scores (helpful = lowers the query token's loss; larger = more helpful):

* **BIF, per training token**: ``−BIF[(i, p), q] = Cov(ℓ_{i,p}, φ_q)`` under the localized
  posterior (:func:`inrun_shapley.posthoc.bif.bayesian_influence`, settings picked by
  :func:`~inrun_shapley.posthoc.bif.choose_config` from curvature and autocorrelation only, the
  ``prior`` control variate); also ranked by the correlation instead of the covariance.
  The library averages a training sample's loss over trailing dims, so each training token is
  passed as its own sample: ``train_samples = {"seq": i, "pos": p}`` rows, whose loss the
  benchmark's ``loss_fn`` gathers from one forward pass per distinct sequence.
* **BIF, per training sequence**: the mean of a sequence's 12 token scores (by linearity of the
  covariance this is exactly the BIF of the sequence's mean loss).
* **in-run per-query values**: ``ShapleyTracker(..., val_loss_fn=<per-token losses [m, 4]>,
  per_query=True)`` during the same training run, values ``[300, 64]``: one value per training
  *sequence* and query token (the tracker values a training sample as a whole; it has no
  per-training-token form), so it is compared with BIF at the sequence level.

Rates, over the 64 query tokens, for k = 1, 5, 10, each beside its chance rate (the same
top-k drawn uniformly at random: ``1 − C(N−M, k)/C(N, k)`` with M matching rows of N, averaged
over query tokens):

* token level, all 3,600 training tokens: the top k contain the English translation (a training
  token whose word is the query word's aligned English word), the same French word, either;
* token level, English-half tokens only (1,500 rows): the top k contain the translation;
* sequence level (BIF and in-run): the top k training sequences contain the translation pair.

Run:  python -m benchmarks.bif_tokens                    # about 3 minutes on one (shared) thread
      python -m benchmarks.bif_tokens --quick            # smoke run (seconds)
Figure (``--out``): the rates against chance, and for one query token the per-token scores over
the top training sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import cli
from benchmarks.common.bilingual import FR_START, SEQ_LEN, BilingualCorpus, make_bilingual_corpus
from benchmarks.common.models import TinyTransformerLM
from inrun_shapley import ShapleyTracker
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence, choose_config

KS = (1, 5, 10)
PREDICTIONS = SEQ_LEN - 1  # next-token predictions per sequence (targets are tokens 1..12)


# ------------------------------------------------------------------------------ losses
def token_losses(model: torch.nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """``[m, 13]`` sequences → ``[m, 12]`` next-token losses (nats); column p targets token p + 1."""
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")


def make_train_loss(train: torch.Tensor):
    """The BIF training loss: a batch of sequences → ``[B]`` mean token loss (the SGLD potential);
    a batch of token rows ``{"seq": [B], "pos": [B]}`` → ``[B]`` the loss of each row's token."""

    def loss_fn(model, batch):
        if isinstance(batch, dict):
            idx, pos = batch["seq"], batch["pos"]
            if idx.shape[0] == 1:  # one row (per-sample gradients run each row alone, under vmap)
                return token_losses(model, train[idx]).gather(1, pos[:, None])[:, 0]
            distinct, inverse = torch.unique(idx, return_inverse=True)
            return token_losses(model, train[distinct])[inverse, pos]
        seqs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return token_losses(model, seqs).mean(1)

    return loss_fn


def query_token_losses(model, batch) -> torch.Tensor:
    """``(seqs [m, 13], positions [m, 4])`` → ``[m, 4]`` losses of the query tokens."""
    seqs, positions = batch
    return token_losses(model, seqs).gather(1, positions)


# ------------------------------------------------------------------------------ setup
@dataclasses.dataclass
class QueryTokens:
    """The query tokens, flattened row-major from ``[m, 4]``: sequence, prediction position,
    French word id and its English translation's id."""

    positions: torch.Tensor  # [m, 4] prediction positions (target = token position + 1)
    seq: np.ndarray
    pos: np.ndarray
    word: np.ndarray
    translation: np.ndarray


def query_tokens(corpus: BilingualCorpus) -> QueryTokens:
    """The four French content words of each query (slots other than the articles)."""
    rows = []
    for ids in corpus.queries.tolist():
        slots = [j for j in range(FR_START, SEQ_LEN) if corpus.is_content(ids[j])]
        rows.append([j - 1 for j in slots])
    positions = torch.tensor(rows)
    m, per = positions.shape
    seq = np.repeat(np.arange(m), per)
    pos = positions.reshape(-1).numpy()
    word = corpus.queries[torch.as_tensor(seq), torch.as_tensor(pos) + 1].numpy()
    translation = np.array([corpus.translation_id(int(w)) for w in word])
    return QueryTokens(positions, seq, pos, word, translation)


def train_model(corpus: BilingualCorpus, queries, args, tracker_on: bool):
    """AdamW on the mean token loss; the per-query tracker rides along when ``tracker_on``."""
    torch.manual_seed(args.seed)
    model = TinyTransformerLM(len(corpus.vocab), PREDICTIONS, d=args.width, heads=2, layers=args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    tracker = None
    if tracker_on:
        tracker = ShapleyTracker(model, opt, val_data=queries, val_loss_fn=query_token_losses, per_query=True)
    n = len(corpus.train)
    gen = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.perf_counter()
    while step < args.steps:
        for ids in torch.randperm(n, generator=gen).split(args.batch):
            if tracker is not None:
                tracker.begin_batch(ids)
            token_losses(model, corpus.train[ids]).mean().backward()
            if tracker is not None:
                tracker.after_backward()
                tracker.end_batch()
            opt.step()
            opt.zero_grad()
            step += 1
            if step == args.steps:
                break
    seconds = time.perf_counter() - t0
    values = None
    if tracker is not None:
        tracker.detach()
        values = np.asarray(tracker.values, dtype=np.float64)
    return model, values, seconds


# ------------------------------------------------------------------------------ scoring
def chance_topk(n: int, matches: int, k: int) -> float:
    """Probability that k rows drawn without replacement from n include one of ``matches`` rows."""
    if matches <= 0:
        return 0.0
    if n - matches < k:
        return 1.0
    return 1.0 - math.exp(math.lgamma(n - matches + 1) - math.lgamma(n - matches - k + 1)
                          - math.lgamma(n + 1) + math.lgamma(n - k + 1))


def topk_rates(helpful: np.ndarray, is_match: np.ndarray, ks=KS) -> dict:
    """Hit rates and chance rates of the top-k rows.

    Args:
        helpful: ``[N, Q]`` scores, larger = more helpful.
        is_match: ``[N, Q]`` bool, the rows that count as a hit for each query.

    Returns:
        ``{k: (rate, chance)}`` averaged over the Q queries (ties broken by row order, stable).
    """
    order = np.argsort(-helpful, axis=0, kind="stable")
    n = helpful.shape[0]
    out = {}
    for k in ks:
        top = order[:k]
        hits = np.take_along_axis(is_match, top, axis=0).any(axis=0)
        chance = [chance_topk(n, int(c), k) for c in is_match.sum(axis=0)]
        out[k] = (float(hits.mean()), float(np.mean(chance)))
    return out


def evaluate(corpus: BilingualCorpus, qt: QueryTokens, scores: dict) -> dict:
    """All rates: ``{row label: {k: (rate, chance)}}``.

    ``scores`` maps ``"bif"``/``"bif_corr"`` to ``[n·12, Q]`` token-level helpfulness and
    ``"inrun"`` to ``[n, Q]`` sequence-level values (larger = more helpful)."""
    n = len(corpus.train)
    targets = corpus.train[:, 1:].reshape(-1).numpy()  # word of each training token row (i, p)
    english_half = np.tile(np.arange(PREDICTIONS) + 1 < FR_START - 1, n)  # targets 1..5 are the English words
    translation = targets[:, None] == qt.translation[None, :]
    same = targets[:, None] == qt.word[None, :]
    contains = np.stack([(corpus.train[:, :FR_START - 1].numpy() == t).any(1) for t in qt.translation], axis=1)
    rates = {}
    for name in ("bif", "bif_corr"):
        if name not in scores:
            continue
        s = scores[name]
        label = "BIF" if name == "bif" else "BIF (correlation)"
        rates[f"{label}, tokens: translation (EN)"] = topk_rates(s, translation)
        rates[f"{label}, tokens: same word (FR)"] = topk_rates(s, same)
        rates[f"{label}, tokens: either"] = topk_rates(s, translation | same)
        rates[f"{label}, English tokens only: translation"] = topk_rates(s[english_half], translation[english_half])
        rates[f"{label}, sequences: contain the pair"] = topk_rates(s.reshape(n, PREDICTIONS, -1).mean(1), contains)
    if "inrun" in scores:
        rates["in-run per-query, sequences: contain the pair"] = topk_rates(scores["inrun"], contains)
    return rates


# ------------------------------------------------------------------------------ BIF
def run_bif(model, corpus: BilingualCorpus, queries, args) -> tuple[object, BIFConfig, dict]:
    n = len(corpus.train)
    train_rows = {"seq": torch.arange(n).repeat_interleave(PREDICTIONS),
                  "pos": torch.arange(PREDICTIONS).repeat(n)}
    loss_fn = make_train_loss(corpus.train)
    loader = DataLoader(TensorDataset(corpus.train), batch_size=args.batch, shuffle=True)
    base = BIFConfig(n_beta=args.n_beta, gamma=args.gamma, chains=args.chains, draws=args.draws, seed=args.seed,
                     control_variate=None if args.control_variate == "none" else args.control_variate)
    chosen, report = choose_config(model, loss_fn, loader, train_rows, queries, base=base,
                                   observable_fn=query_token_losses, pilot_draws=args.pilot_draws)
    result = bayesian_influence(model, loss_fn, loader, train_rows, queries, config=chosen,
                                observable_fn=query_token_losses, progress=False)
    return result, chosen, report


# ------------------------------------------------------------------------------ figure
def plot(path: str, corpus: BilingualCorpus, qt: QueryTokens, rates: dict, helpful: np.ndarray, q: int) -> None:
    """Left: the rates at k=1,5,10 against chance. Right: −BIF over the tokens of the 8 training
    sequences with the highest sequence-level score for query token ``q``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    labels = [lab for lab in rates if not lab.startswith("BIF (correlation)") and "either" not in lab]
    width = 0.8 / len(KS)
    y = np.arange(len(labels))
    for j, k in enumerate(KS):
        vals = [rates[lab][k][0] for lab in labels]
        chance = [rates[lab][k][1] for lab in labels]
        ax.barh(y + j * width, vals, height=width, label=f"top-{k}")
        ax.scatter(chance, y + j * width, marker="|", s=120, color="k", zorder=3,
                   label="chance" if j == 0 else None)
    ax.set_yticks(y + width)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of {len(qt.word)} query tokens whose top-k holds the match")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)

    n = len(corpus.train)
    per_token = helpful[:, q].reshape(n, PREDICTIONS)
    top = np.argsort(-per_token.mean(1), kind="stable")[:8]
    ax2 = fig.add_subplot(1, 2, 2)
    grid = per_token[top]
    lim = float(np.abs(grid).max()) or 1.0
    im = ax2.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    word, translation = corpus.vocab[qt.word[q]], corpus.vocab[qt.translation[q]]
    for r, i in enumerate(top):
        for p in range(PREDICTIONS):
            w = corpus.vocab[int(corpus.train[i, p + 1])]
            bold = "bold" if w in (word, translation) else "normal"
            ax2.text(p, r, w, ha="center", va="center", fontsize=6.5, fontweight=bold)
    ax2.set_yticks(range(len(top)))
    ax2.set_yticklabels([f"train #{int(i)}" for i in top], fontsize=7)
    ax2.set_xticks(range(PREDICTIONS))
    ax2.set_xticklabels([f"→{p + 1}" for p in range(PREDICTIONS)], fontsize=7)
    prefix = " ".join(corpus.words(corpus.queries[qt.seq[q], :qt.pos[q] + 1]))
    ax2.set_title(f"query: {prefix} [{word}]   (translation of '{translation}')\n"
                  "−BIF (covariance of token losses) over each training token = the word it predicts",
                  fontsize=8)
    fig.colorbar(im, ax=ax2, fraction=0.04, label="−BIF (helpful > 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_quick(p)
    cli.add_seed(p)
    cli.add_threads(p)
    cli.add_out(p, "figure path (PNG)", default=os.path.join(tempfile.gettempdir(), "bif_tokens.png"))
    p.add_argument("--train", type=int, default=300, help="training sequences")
    p.add_argument("--queries", type=int, default=16, help="held-out query sequences (4 query tokens each)")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n-beta", type=float, default=50.0, help="BIF nβ (posterior temperature × n)")
    p.add_argument("--gamma", type=float, default=1e3, help="BIF localization γ")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=100, help="draws per chain")
    p.add_argument("--pilot-draws", type=int, default=50, help="choose_config's pilot draws per chain")
    p.add_argument("--control-variate", default="prior", choices=("none", "prior", "diagonal"))
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.queries, args.steps, args.draws, args.pilot_draws, args.chains = 60, 3, 30, 6, 20, 2
    return args


def run(args) -> dict:
    """Train (with the in-run tracker), run BIF, score; returns everything printed."""
    cli.set_threads(args.threads)
    corpus = make_bilingual_corpus(args.train, args.queries, seed=args.seed)
    qt = query_tokens(corpus)
    queries = (corpus.queries, qt.positions)
    model, inrun, train_s = train_model(corpus, queries, args, tracker_on=True)
    with torch.no_grad():
        tl = token_losses(model, corpus.queries)
        pred = model(corpus.queries[:, :-1]).argmax(-1)
        acc = float((pred.gather(1, qt.positions) == corpus.queries[:, 1:].gather(1, qt.positions)).float().mean())
        info = {"train_s": train_s, "query_token_loss": float(tl.gather(1, qt.positions).mean()),
                "query_token_accuracy": acc, "train_loss": float(token_losses(model, corpus.train).mean()),
                "params": sum(p.numel() for p in model.parameters()), "vocab": len(corpus.vocab)}
    result, chosen, report = run_bif(model, corpus, queries, args)
    bif = result.bif.double().numpy().reshape(len(corpus.train) * PREDICTIONS, -1)
    corr = result.correlation.double().numpy().reshape(bif.shape)
    scores = {"bif": -bif, "bif_corr": -corr, "inrun": inrun[: len(corpus.train)]}
    rates = evaluate(corpus, qt, scores)
    d = result.diagnostics
    info.update(bif_s=result.seconds, bif_config={k: getattr(chosen, k) for k in
                                                   ("step_size", "n_beta", "gamma", "chains", "draws", "burn_in",
                                                    "thin", "control_variate")},
                rhat=float(d.rhat), ess=float(d.ess), tau_steps=report["tau_steps"],
                n_train_tokens=bif.shape[0], n_query_tokens=bif.shape[1])
    plot(args.out, corpus, qt, rates, scores["bif"], q=0)  # the first query token, whatever its score
    examples = []
    for j in range(min(3, bif.shape[1])):
        top = np.argsort(-scores["bif"][:, j], kind="stable")[:5]
        words = [corpus.vocab[int(corpus.train[i // PREDICTIONS, i % PREDICTIONS + 1])] for i in top]
        examples.append((corpus.vocab[qt.word[j]], corpus.vocab[qt.translation[j]], words))
    return {"info": info, "rates": rates, "examples": examples, "figure": args.out}


def report_lines(out: dict) -> list[str]:
    info = out["info"]
    lines = [f"model: {info['params']} parameters, vocab {info['vocab']}; trained in {info['train_s']:.1f} s "
             f"(with the per-query tracker); train token loss {info['train_loss']:.3f}, query-token loss "
             f"{info['query_token_loss']:.3f}, query-token accuracy {info['query_token_accuracy']:.3f}",
             f"BIF: {info['n_train_tokens']} training tokens × {info['n_query_tokens']} query tokens in "
             f"{info['bif_s']:.1f} s; settings {info['bif_config']}; R̂ {info['rhat']:.3f}, ESS {info['ess']:.0f}, "
             f"τ {info['tau_steps']:.1f} steps", "",
             "| ranking | " + " | ".join(f"top-{k} (chance)" for k in KS) + " |",
             "|---|" + "---|" * len(KS)]
    for label, by_k in out["rates"].items():
        lines.append(f"| {label} | " + " | ".join(f"{by_k[k][0]:.2f} ({by_k[k][1]:.2f})" for k in KS) + " |")
    lines.append("")
    for word, tr, words in out["examples"]:
        lines.append(f"query token '{word}' (translation '{tr}'): top-5 training tokens by −BIF: {' '.join(words)}")
    lines.append(f"figure: {out['figure']}")
    return lines


def main(argv=None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    print("$ " + cli.command_line("bif_tokens", argv), flush=True)
    out = run(args)
    for line in report_lines(out):
        print(line)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main()
