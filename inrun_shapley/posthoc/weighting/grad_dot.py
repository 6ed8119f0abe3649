"""Per-group gradient dot products from ``torch.func`` per-sample gradients: the math behind
:func:`~inrun_shapley.posthoc.weighting.compute_group_components`.

For every checkpoint ``c``, per-sample gradients ``g_i`` (training) and ``g_q`` (queries) are
taken with ``vmap(grad(...))`` through ``functional_call`` (the model's own parameters are never
modified), flattened per group ``j`` in float64, optionally preconditioned (``P_c ⊙ g_i``) and
projected (``R_j``), and ``η_c · ⟨R_j g_q, R_j (P_c ⊙ g_i)⟩`` is added to ``C_j(i, q)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from inrun_shapley.posthoc.loss_convention import model_batch_loss
from inrun_shapley.posthoc.weighting.groups import ParameterGroups

PerSampleGrad = Callable[..., dict[str, torch.Tensor]]
"""``fn(params, rest, x [B, ...], y [B, ...]) -> {name: [B, *param.shape]}``."""


def per_sample_grad_fn(model: nn.Module, loss_fn: Callable) -> PerSampleGrad:
    """``vmap(grad(loss of one sample))`` over a batch, through ``functional_call``.

    Args:
        model: the model; called as ``model(x[None])`` on one sample at a time.
        loss_fn: ``fn(model, batch) -> [1]`` (or a scalar) loss of a batch ``(x[None], y[None])``
            of one sample (the deprecated ``loss(outputs, targets)`` is converted, with a
            warning).
    """
    loss_fn = model_batch_loss(loss_fn, "loss_fn")

    def single(params, rest, x, y):
        call = lambda *a: functional_call(model, {**rest, **params}, a)  # noqa: E731
        return loss_fn(call, (x.unsqueeze(0), y.unsqueeze(0))).sum()

    return vmap(grad(single), in_dims=(None, None, 0, 0))


def group_projections(
    groups: ParameterGroups, state: Mapping[str, torch.Tensor], projection_dim: int | None, seed: int
) -> list[torch.Tensor | None]:
    """One Gaussian projection ``R_j`` per group, ``[d_j, k] / sqrt(k)`` in float64.

    Drawn once, in group order, from a generator seeded with ``seed``, so every checkpoint uses
    the same projections. None (identity) where ``projection_dim`` is None or ≥ the group's
    size ``d_j``.
    """
    projections: list[torch.Tensor | None] = []
    gen = torch.Generator().manual_seed(seed)
    for g in groups.names:
        d = sum(state[n].numel() for n in groups.members[g])
        if projection_dim is None or projection_dim >= d:
            projections.append(None)
        else:
            r = torch.randn(d, projection_dim, generator=gen, dtype=torch.float64)
            projections.append(r / projection_dim**0.5)
    return projections


def flatten_by_group(
    per_param: Mapping[str, torch.Tensor], groups: ParameterGroups, batch: int
) -> list[torch.Tensor]:
    """``{name: [B, *shape]}`` → one ``[B, d_j]`` float64 matrix per group, in group order."""
    return [
        torch.cat([per_param[n].reshape(batch, -1) for n in groups.members[g]], dim=1).double()
        for g in groups.names
    ]


def batched_grads(
    fn: PerSampleGrad, params: dict, rest: dict, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of all of ``x`` in chunks of ``batch_size``, concatenated."""
    parts = [fn(params, rest, x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def grad_dot_components(
    model: nn.Module,
    loss_fn: Callable,
    query_loss_fn: Callable,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    groups: ParameterGroups,
    states: Sequence[Mapping[str, torch.Tensor]],
    lrs: Sequence[float],
    preconds: Sequence[Mapping[str, torch.Tensor] | None],
    projection_dim: int | None,
    batch_size: int,
    seed: int,
) -> np.ndarray:
    """``C_j(i, q) = Σ_c η_c · ⟨R_j g_q^{c,j}, R_j (P_c^j ⊙ g_i^{c,j})⟩`` for all groups.

    The inputs are already validated by the caller. The model is in eval mode during the
    computation; its train/eval modes are restored afterwards.

    Args:
        model: the model.
        loss_fn: training loss, ``fn(model, batch)`` on a batch of one sample.
        query_loss_fn: query loss for one sample.
        train: ``(inputs [n_train, ...], targets [n_train, ...])``.
        query: ``(inputs [n_query, ...], targets [n_query, ...])``.
        groups: the parameter groups (fix the order of the first axis).
        states: one state dict per checkpoint, holding every trainable parameter; missing
            buffers and frozen parameters are taken from the model.
        lrs: ``η_c`` per checkpoint.
        preconds: ``{name: P}`` per checkpoint, or None.
        projection_dim: per-group projection size, or None.
        batch_size: samples per ``vmap`` call.
        seed: seeds the projections.

    Returns:
        ``[G, n_train, n_query]`` float64.
    """
    trainable = list(groups.param_names)
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    frozen_names = [n for n in named if n not in set(trainable)]
    x_tr, y_tr = train
    x_q, y_q = query
    n_tr, n_q = len(x_tr), len(x_q)
    out = torch.zeros(len(groups), n_tr, n_q, dtype=torch.float64)
    grad_train, grad_query = per_sample_grad_fn(model, loss_fn), per_sample_grad_fn(model, query_loss_fn)
    projections = group_projections(groups, states[0], projection_dim, seed)

    def project(j: int, m: torch.Tensor) -> torch.Tensor:
        return m if projections[j] is None else m @ projections[j]

    was_training = {name: mod.training for name, mod in model.named_modules()}
    model.eval()
    try:
        for st, lr, pc in zip(states, lrs, preconds):
            params = {n: st[n].detach().to(named[n].dtype) for n in trainable}
            rest = {n: st[n].detach() if n in st else b for n, b in buffers.items()}
            rest.update({n: (st[n] if n in st else named[n]).detach() for n in frozen_names})
            pc_flat = None
            if pc is not None:
                pc_flat = flatten_by_group({n: pc[n].detach().unsqueeze(0) for n in trainable}, groups, 1)
            query_grads = flatten_by_group(batched_grads(grad_query, params, rest, x_q, y_q, batch_size), groups, n_q)
            gq = [project(j, m) for j, m in enumerate(query_grads)]
            for start in range(0, n_tr, batch_size):
                stop = min(start + batch_size, n_tr)
                g = grad_train(params, rest, x_tr[start:stop], y_tr[start:stop])
                for j, m in enumerate(flatten_by_group(g, groups, stop - start)):
                    if pc_flat is not None:
                        m = m * pc_flat[j]
                    out[j, start:stop] += lr * (project(j, m) @ gq[j].T)
    finally:
        for name, mod in model.named_modules():
            mod.training = was_training[name]
    return out.numpy()


__all__ = ["batched_grads", "flatten_by_group", "grad_dot_components", "group_projections", "per_sample_grad_fn"]
