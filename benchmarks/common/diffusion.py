"""A small DDPM on scikit-learn's 8×8 digits, with a deterministic (fixed-noise) loss.

The pieces behind ``benchmarks.diffusion``: noise schedule, denoiser, the fixed-noise
denoising loss, DDPM sampling, the plain training loop of the retrained subset models, and
the two aspect measurements of a generated digit (class logit margin, ink).

**Fixed noise.** Attribution needs the loss to be a deterministic function of the weights:
the adjoint pass replays every recorded step, TracIn takes per-sample gradients, and the
LDS compares the same quantity across retrained models. So every image carries ``K`` fixed
``(timestep, noise)`` pairs drawn once from a seed (a training image keeps its own pairs in
every subset model) and its loss is the average denoising error over them:

    ℓ(θ; x0, {t_k, ε_k}) = mean_k mean_pixels (ε_θ(√ᾱ_{t_k} x0 + √(1-ᾱ_{t_k}) ε_k, t_k) − ε_k)²

For a generated sample (a query) the same formula with its own ``K_q`` fixed pairs is the
utility (lower = the model explains the sample better; the benchmark scores ``−ℓ``).

**Packing.** Every row is one tensor ``[K, 129]``: the clean image ``x0`` (64 pixels in
[-1, 1]), the noise ``ε`` (64) and the timestep ``t`` (1, as a float), so a row goes through
``TensorDataset``/``IndexedDataset``, ``compute_group_components`` (``model(packed)``) and the
adjoint pass (``train_data[ids]``) unchanged. :class:`DiffusionNet` ``(packed) -> [K, 128]``
returns the predicted noise and the one-step denoised estimate
``x̂0 = (x_t − √(1-ᾱ_t) ε̂) / √ᾱ_t`` side by side.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

PIXELS = 64
PACKED = 2 * PIXELS + 1
T_STEPS = 50
HIDDEN = 128
TIME_FEATURES = 32


def schedule(T: int = T_STEPS) -> Tensor:
    """``ᾱ_t`` for ``t = 0..T-1`` (float32 ``[T]``): linear betas from 1e-4·1000/T to 0.02·1000/T."""
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


ALPHA_BAR = schedule()


def time_features(t: Tensor, dim: int = TIME_FEATURES) -> Tensor:
    """Sinusoidal features of (float) timesteps ``t [...]`` → ``[..., dim]`` (no parameters)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    ang = t[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class DiffusionNet(nn.Module):
    """ε-prediction MLP with a timestep embedding; every parameterized layer is ``nn.Linear``.

    ``h = SiLU(inp(x_t) + time_in(φ(t)))``, ``h = SiLU(hidden(h) + time_hidden(φ(t)))``,
    ``ε̂ = out(h)`` (φ: sinusoidal features; each block gets its own timestep projection, as in
    a UNet's residual blocks). Linear layers act on the last axis, so a row of ``K`` noised copies is one
    sample with ``K`` positions (like a token sequence) for the per-sample gradients.
    """

    def __init__(self, hidden: int = HIDDEN, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time_in = nn.Linear(TIME_FEATURES, hidden)
        self.inp = nn.Linear(PIXELS, hidden)
        self.time_hidden = nn.Linear(TIME_FEATURES, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, PIXELS)
        self.register_buffer("alpha_bar", ALPHA_BAR.clone())

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise ``ε̂ [..., 64]`` for noised images ``x_t [..., 64]`` at float steps ``t [...]``."""
        phi = time_features(t)
        h = F.silu(self.inp(x_t) + self.time_in(phi))
        return self.out(F.silu(self.hidden(h) + self.time_hidden(phi)))

    def forward(self, packed: Tensor) -> Tensor:
        """``packed [..., 129]`` (x0, ε, t) → ``[..., 128]``: (ε̂, x̂0)."""
        x0, eps, t = packed[..., :PIXELS], packed[..., PIXELS:2 * PIXELS], packed[..., -1]
        ab = self.alpha_bar[t.long()][..., None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        eps_hat = self.denoise(x_t, t)
        x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        return torch.cat([eps_hat, x0_hat], dim=-1)


def pack(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``x0 [n, 64]``, ``t [n, K]`` (long), ``eps [n, K, 64]`` → packed ``[n, K, 129]`` float32."""
    n, K = t.shape
    return torch.cat([x0[:, None, :].expand(n, K, PIXELS), eps, t[..., None].float()], dim=-1)


def fixed_noise(x0: Tensor, K: int, seed: int, timesteps: Tensor | None = None) -> Tensor:
    """Pack every image with ``K`` fixed (timestep, noise) pairs drawn from ``seed``.

    Args:
        x0: ``[n, 64]`` images in [-1, 1].
        K: pairs per image.
        seed: seeds a private generator (the global RNG is untouched).
        timesteps: ``[K]`` steps shared by every image (the queries: evenly spread); default
            uniform random steps per image.

    Returns:
        ``[n, K, 129]`` packed rows (see the module docstring).
    """
    g = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    if timesteps is None:
        t = torch.randint(0, T_STEPS, (n, K), generator=g)
    else:
        t = timesteps.long()[None, :].expand(n, K)
    eps = torch.randn(n, K, PIXELS, generator=g)
    return pack(x0, t, eps)


def per_sample_loss(model: nn.Module, packed: Tensor) -> Tensor:
    """Fixed-noise denoising loss of each row: ``packed [B, K, 129]`` → ``[B]``."""
    eps_hat = model(packed)[..., :PIXELS]
    return ((eps_hat - packed[..., PIXELS:2 * PIXELS]) ** 2).mean(dim=(-1, -2))


def denoising_loss_fn(outputs: Tensor, packed: Tensor) -> Tensor:
    """``compute_group_components`` loss: model outputs and packed rows of one sample → scalar."""
    return ((outputs[..., :PIXELS] - packed[..., PIXELS:2 * PIXELS]) ** 2).mean(dim=(-1, -2)).sum()


def load_images(n_train: int, n_class: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits shuffled with ``seed``: ``(x_train [n_train, 64] in [-1, 1], y_train,
    x_rest, y_rest)``; the rest trains the aspect classifier (``n_class`` rows)."""
    from benchmarks.common.data import load_digits_splits

    (x, y), (xc, yc) = load_digits_splits((n_train, n_class), np.random.default_rng(seed), scale="unit")
    return 2 * x - 1, y, 2 * xc - 1, yc


def batch_order(n: int, seed: int, epochs: int, batch_size: int) -> list[list[int]]:
    """Every step's sample ids: one permutation of ``range(n)`` per epoch from a generator seeded
    with ``seed + 1``, cut into batches (the last one of an epoch may be smaller).

    Drawn up front so the plain loop and the Lightning run (one long epoch over a
    ``batch_sampler``; Lightning's own epoch loop would draw the next permutation at another
    moment) take exactly the same batches."""
    g = torch.Generator().manual_seed(seed + 1)
    order = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        order += [perm[s:s + batch_size] for s in range(0, n, batch_size)]
    return order


def train_denoiser(packed: Tensor, *, seed: int, epochs: int, batch_size: int, lr: float,
                   weight_decay: float = 0.0) -> DiffusionNet:
    """AdamW on the mean fixed-noise loss: the recipe of every model of one seed.

    Same initialization (``seed``) and the same batch-order generator (:func:`batch_order`)
    for every subset, as in the LDS harness."""
    model = DiffusionNet(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for ids in batch_order(len(packed), seed, epochs, batch_size):
        opt.zero_grad()
        per_sample_loss(model, packed[ids]).mean().backward()
        opt.step()
    return model


def loader(packed: Tensor, seed: int, epochs: int, batch_size: int) -> DataLoader:
    """All of :func:`batch_order`'s steps as ONE pass of a loader over ``IndexedDataset`` rows
    ``(packed, id)``: train it with ``max_epochs=1``."""
    from inrun_shapley import IndexedDataset

    return DataLoader(IndexedDataset(TensorDataset(packed)),
                      batch_sampler=batch_order(len(packed), seed, epochs, batch_size))


@torch.no_grad()
def sample(model: DiffusionNet, n: int, seed: int) -> Tensor:
    """DDPM ancestral sampling with ``T_STEPS`` steps from a seeded generator: ``[n, 64]`` in [-1, 1].

    The ``x̂0`` estimate is clipped to [-1, 1] at every step (the usual trick for few steps)."""
    g = torch.Generator().manual_seed(seed)
    ab = model.alpha_bar.double()
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    x = torch.randn(n, PIXELS, generator=g, dtype=torch.float64)
    for t in reversed(range(T_STEPS)):
        tt = torch.full((n,), float(t))
        eps = model.denoise(x.float(), tt).double()
        x0 = ((x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()).clamp(-1, 1)
        beta = 1 - ab[t] / ab_prev[t]
        mean = (ab_prev[t].sqrt() * beta / (1 - ab[t])) * x0 + ((1 - beta).sqrt() * (1 - ab_prev[t]) / (1 - ab[t])) * x
        if t > 0:
            var = beta * (1 - ab_prev[t]) / (1 - ab[t])
            x = mean + var.sqrt() * torch.randn(n, PIXELS, generator=g, dtype=torch.float64)
        else:
            x = mean
    return x.float().clamp(-1, 1)


# --------------------------------------------------------------------------------- aspects
def train_classifier(x: Tensor, y: Tensor, seed: int, epochs: int = 200) -> nn.Module:
    """The aspect classifier: a 64-64-10 tanh MLP on images in [-1, 1] (Adam, full batch)."""
    torch.manual_seed(seed)
    clf = nn.Sequential(nn.Linear(PIXELS, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(clf(x), y).backward()
        opt.step()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf.eval()


def ink(x: Tensor) -> Tensor:
    """Total ink of images ``[..., 64]`` in [-1, 1]: ``Σ (x + 1) / 2`` (0..64 pixels' worth)."""
    return ((x + 1) / 2).sum(-1)


def margin(logits: Tensor, label: Tensor) -> Tensor:
    """``logit_y − logsumexp(other logits)`` (vmap-safe one-hot)."""
    mask = torch.arange(logits.shape[-1], device=logits.device) == label[..., None]
    correct = (logits * mask).sum(-1)
    return correct - torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1)


def class_aspect_loss(classifier: nn.Module):
    """Query loss of the class aspect: ``−mean_k margin_c(classifier(x̂0_k))`` for target class c.

    Used with ``compute_group_components(query_loss_fn=...)``: positive component = a step on
    the training image raises the generated digit's class margin in the model's denoised
    reconstruction."""

    def loss(outputs: Tensor, label: Tensor) -> Tensor:
        x0_hat = outputs[..., PIXELS:].clamp(-1.5, 1.5)
        return -margin(classifier(x0_hat), label[..., None].expand(x0_hat.shape[:-1])).mean()

    return loss


def ink_aspect_loss(outputs: Tensor, direction: Tensor) -> Tensor:
    """Query loss of the style aspect: ``−s · mean_k ink(x̂0_k) / 64`` with ``s = ±1`` the sign of
    the generated digit's ink minus the training mean (positive component = a step on the
    training image pushes the reconstruction's ink further the way the sample deviates)."""
    x0_hat = outputs[..., PIXELS:].clamp(-1.5, 1.5)
    return -(direction * ink(x0_hat).mean(-1) / PIXELS).sum()


__all__ = [
    "ALPHA_BAR", "DiffusionNet", "HIDDEN", "PACKED", "PIXELS", "T_STEPS", "batch_order", "class_aspect_loss",
    "denoising_loss_fn", "fixed_noise", "ink", "ink_aspect_loss", "load_images", "loader", "margin", "pack",
    "per_sample_loss", "sample", "schedule", "time_features", "train_classifier", "train_denoiser",
]
