"""Models, data and the training loop shared by the FSDP2 tests (single process and torchrun ranks).

Both sides run the same global batches in the same order: one process the whole batch, each of
``W`` ranks its contiguous ``1/W`` of the rows. The FSDP side wraps every block and the root with
``fully_shard`` (the tied embedding/head weight stays in the root's group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker

N_TRAIN, N_VAL, BATCH, STEPS = 32, 10, 8, 6
VOCAB, SEQ, WIDTH = 13, 6, 16


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, from Linear and LayerNorm only."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        t = x.shape[1]
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.proj(att @ v)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Token and position embeddings, two blocks, final LayerNorm, head tied to the token embedding."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH) for _ in range(2)])
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1]).expand_as(idx)
        x = self.tok(idx) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def make(kind: str, seed: int = 0):
    """``(model, blocks to shard besides the root, train (x, y), validation (x, y), loss_fn)``;
    ``loss_fn(model, batch)`` returns per-sample losses ``[rows]``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(7, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 24), nn.Tanh(),
                              nn.Linear(24, 5))
        blocks = [model[0], model[3]]
        x = torch.randn(N_TRAIN + N_VAL, 7, generator=g)
        y = (x @ torch.randn(7, 5, generator=g)).argmax(1)

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1], reduction="none")
    else:
        model = TinyLM()
        blocks = list(model.blocks)
        x = torch.randint(0, VOCAB, (N_TRAIN + N_VAL, SEQ + 1), generator=g)
        x[:, 1::2] = (x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1) % VOCAB  # learnable structure
        x, y = x[:, :-1], x[:, 1:]

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]).transpose(1, 2), b[1], reduction="none").mean(1)
    train, val = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    return model, blocks, train, val, loss_fn


def global_batches():
    """Sample ids of every step's global batch: a fixed permutation, ``STEPS`` steps."""
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(7))
    return [order[(s * BATCH) % N_TRAIN:][:BATCH] for s in range(STEPS)]


def train(kind: str, rank: int = 0, world: int = 1, shard=None, **tracker_options):
    """Train ``kind`` with a tracker over the global batches (this rank's rows of each);
    ``shard(model, blocks)`` wraps the model (FSDP). Returns the tracker (detached)."""
    model, blocks, (x, y), val, loss_fn = make(kind)
    if shard is not None:
        shard(model, blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=loss_fn, val_batch_size=4, **tracker_options)
    for ids in global_batches():
        mine = ids.tensor_split(world)[rank]
        with tracker.batch(mine):
            loss_fn(model, (x[mine], y[mine])).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    tracker.detach()
    return tracker
