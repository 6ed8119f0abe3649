"""The benchmarks' model zoo: the digits MLP / logistic regression and the small transformer LM.

* :func:`mlp`: ``nn.Sequential`` of Linear + ReLU/Tanh layers (no hidden layer = logistic
  regression); the demo's model, shared from :mod:`inrun_shapley.app.digits`.
* :class:`TinyTransformerLM`: a word-level causal LM whose attention is written with
  ``nn.Linear`` projections (``q``, ``k``, ``v``, ``o``) rather than ``nn.MultiheadAttention``,
  so every parameterized layer (Embedding, Linear, LayerNorm) has a dedicated capture rule.
  Used by ``overhead`` (the issue's reference transformer), ``text_source_id`` and
  ``weighting_text`` (whose parameter groups match the names ``q``/``k``/``v``/``o``/``fc1``/...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun_shapley.app.digits import mlp


class Block(nn.Module):
    """Pre-norm causal self-attention (projections as ``nn.Linear``) and a GELU MLP (4× wide)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        """``x [b, t, d]`` → ``[b, t, d]``."""
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y: Tensor) -> Tensor:  # [b, t, d] -> [b, heads, t, d / heads]
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformerLM(nn.Module):
    """Token + position embeddings, ``layers`` :class:`Block` s, a final LayerNorm and a head.

    Args:
        vocab: vocabulary size.
        max_len: longest sequence (rows of the position embedding).
        d: model width; heads: attention heads (``d`` divisible by ``heads``); layers: blocks.
        padding_idx: token id whose embedding starts (and stays) at zero, e.g. 0 for the text
            corpus's pad token; None for none.
    """

    def __init__(self, vocab: int, max_len: int, d: int = 32, heads: int = 2, layers: int = 2,
                 padding_idx: int | None = None):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        """Token ids ``[b, t]`` → next-token logits ``[b, t, vocab]``."""
        b, t = x.shape
        positions = torch.arange(t, device=x.device).expand(b, t)  # per-sample rows for the tracker
        h = self.tok(x) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def lm_losses(model: nn.Module, seqs: Tensor) -> Tensor:
    """Per-row LM loss: mean next-token cross-entropy over the row's non-pad (id 0) targets.

    Args:
        model: maps ``[m, t - 1]`` token ids to ``[m, t - 1, vocab]`` logits.
        seqs: ``[m, t]`` token ids, padded with 0.

    Returns:
        ``[m]`` losses (nats per token).
    """
    logits = model(seqs[:, :-1])
    target = seqs[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=0, reduction="none")
    mask = (target != 0).to(tok.dtype)
    return (tok * mask).sum(1) / mask.sum(1)


__all__ = ["Block", "TinyTransformerLM", "lm_losses", "mlp"]
