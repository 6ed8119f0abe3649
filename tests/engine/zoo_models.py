"""Tiny versions of the models people train, written the way their sources write them.

Each entry builds ``(model, loss_rows, rows, val)`` in float64: ``loss_rows(forward, *rows)``
returns ``[B]`` per-sample losses (the training loss is their mean). ``late`` names the
parameters a fine-tuning recipe trains later (gradual unfreezing, ``add_param_group``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

V, T, B = 23, 9, 4  # vocabulary, tokens per row (T - 1 = 8 positions: a multiple of B), samples


def _lm_loss(f, tokens):
    """Next-token cross-entropy, mean over each row's positions (``[B]``)."""
    logits = f(tokens[:, :-1])
    logits = getattr(logits, "logits", logits)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return per_token.view(tokens.shape[0], -1).mean(1)


def _class_loss(f, x, y):
    return F.cross_entropy(f(x), y, reduction="none")


def _tokens(n=B, t=T):
    return (torch.randint(0, V, (n, t)),)


# ---------------------------------------------------------------- nanoGPT (arange positions, tied head)
class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln_2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """As nanoGPT writes it: ``pos = torch.arange(0, t)``, ``wte(idx) + wpe(pos)``, tied head."""

    def __init__(self, d=16, heads=2, layers=2, block=16):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, d), wpe=nn.Embedding(block, d), drop=nn.Dropout(0.0),
            h=nn.ModuleList([GPTBlock(d, heads) for _ in range(layers)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------- ViT (timm style, written here)
class ViTBlock(nn.Module):
    """A block with layer-scale ``gamma_1``/``gamma_2`` held as raw parameters beside children."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.gamma_1 = nn.Parameter(0.5 * torch.ones(d))
        self.gamma_2 = nn.Parameter(0.5 * torch.ones(d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.gamma_1 * self.attn(h, h, h, need_weights=False)[0]
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class ViT(nn.Module):
    """``cls_token`` expanded to the batch and ``pos_embed`` added, both raw parameters of the root."""

    def __init__(self, d=16, heads=2, layers=2, patch=4, image=8, classes=5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, d))
        self.blocks = nn.Sequential(*[ViTBlock(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------- GroupNorm ResNet, LSTM LM
class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)

    def forward(self, x):
        out = F.relu(self.gn1(self.conv1(x)))
        return F.relu(x + self.gn2(self.conv2(out)))


class GNResNet(nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.GroupNorm(2, c), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


class LSTMLM(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(V, d), nn.LSTM(d, d, batch_first=True), nn.Linear(d, V)

    def forward(self, idx):
        return self.out(self.rnn(self.emb(idx))[0])


# ---------------------------------------------------------------- Hugging Face
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _lora_gpt2():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    model = get_peft_model(_gpt2(), cfg)
    for name, p in model.named_parameters():  # lora_B starts at 0: give the adapters a non-trivial start
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


@dataclass
class ZooCase:
    make: Callable[[], nn.Module]
    loss: Callable
    data: Callable[[], tuple]
    lr: float
    late: Callable[[str], bool] | None = None  # parameters a fine-tuning recipe trains later


def _images():
    return torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))


ZOO = {
    "nanogpt": ZooCase(NanoGPT, _lm_loss, _tokens, 0.5, late=lambda n: n.startswith("transformer.h.0.")),
    "gpt2": ZooCase(_gpt2, _lm_loss, _tokens, 0.5, late=lambda n: ".h.0." in n),
    "llama": ZooCase(_llama, _lm_loss, _tokens, 0.5, late=lambda n: ".layers.0." in n),
    "vit": ZooCase(ViT, _class_loss, _images, 0.5, late=lambda n: n in ("cls_token", "pos_embed") or "blocks.0." in n),
    "gn_resnet": ZooCase(GNResNet, _class_loss, _images, 0.5, late=lambda n: n.startswith("layer1.0.")),
    "lstm_lm": ZooCase(LSTMLM, _lm_loss, _tokens, 0.5, late=lambda n: n.startswith("rnn.")),
    "lora_gpt2": ZooCase(_lora_gpt2, _lm_loss, _tokens, 0.5, late=lambda n: "lora" in n and ".h.1." in n),
}


def build(name: str):
    """``(model, loss_rows, rows, val)`` for the zoo entry ``name`` (float64, seeded by the caller)."""
    case = ZOO[name]
    model = case.make().double()
    rows, val = case.data(), case.data()
    rows = tuple(r.double() if r.is_floating_point() else r for r in rows)
    val = tuple(r.double() if r.is_floating_point() else r for r in val)
    return model, case.loss, rows, val
