"""Scoring: each captured call dotted with the step's directions, summed per sample (and group).

Pure functions of the captures, the directions and the tracked modules: no tracker state.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.capture.registry import up
from inrun_shapley.engine import sharding
from inrun_shapley.engine.capture_session import MicroBatch
from inrun_shapley.engine.sharding import is_sharded
from inrun_shapley.engine.tracked import TrackedModule

__all__ = ["ScoredStep", "captured_in_half", "grad_sq_norm", "gradient_scale", "grads_zeroed", "score_micro_batches",
           "world_size"]


def world_size(configured: int | None) -> int:
    """``configured``, else the initialized ``torch.distributed`` world size, else 1."""
    if configured is not None:
        return int(configured)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def captured_in_half(batches: Sequence[MicroBatch]) -> bool:
    """Whether any captured output gradient of the step is fp16/bf16 (mixed precision)."""
    half = (torch.float16, torch.bfloat16)
    return any(g is not None and g.dtype in half
               for mb in batches for caps in mb.captures.values() for cap in caps for g in cap.grad_outputs)


class ScoredStep:
    """One step's values: ``ids [n]`` int64, ``values [n]`` (``[n, Q]`` per query) and, if kept,
    ``groups [n, G]`` (per tracked module), float64 numpy arrays."""

    def __init__(self, ids: np.ndarray, values: np.ndarray, groups: np.ndarray | None,
                 module_totals: np.ndarray | None = None):
        self.ids, self.values, self.groups = ids, values, groups
        self.module_totals = module_totals  # [G, Q]: each tracked module's part of the step's sum

    def scale(self, factor: float) -> None:
        """Multiply the values (groups, module totals) by a scalar in place."""
        self.values *= factor
        if self.groups is not None:
            self.groups *= factor
        if self.module_totals is not None:
            self.module_totals *= factor


def score_micro_batches(
    batches: Sequence[MicroBatch],
    modules: Mapping[str, TrackedModule],
    directions: Mapping[int, Tensor],
    *,
    theta: Mapping[str, Mapping[str, Tensor]],
    ghost=None,
    n_directions: int,
    per_query: bool,
    keep_groups: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> ScoredStep:
    """``value[i, q] = Σ_modules Σ_calls <c_i, M[q]>`` for every sample of every micro-batch.

    Args:
        batches: the step's micro-batches, in order.
        modules: ``{name: TrackedModule}`` (group order of ``groups``).
        directions: ``{id(param): M [Q, *shape]}``; parameters without one contribute nothing.
        theta: ``{module name: {param name: value before the step}}`` for rules that read
            parameters.
        ghost: a prepared :class:`~inrun_shapley.engine.queries.GhostQueries` scoring its
            modules, or None.
        n_directions: ``Q``.
        per_query: keep ``[n, Q]`` values (else ``[n]``, ``Q = 1``).
        keep_groups: also return the per-module split (``Q = 1`` only).
        device, dtype: where and in which dtype the values are summed.

    Returns:
        the step's :class:`ScoredStep`, samples in micro-batch order (values not yet scaled).
    """
    all_ids, all_vals, all_groups = [], [], []
    names = list(modules)
    totals = torch.zeros(len(names), n_directions, dtype=dtype, device=device)
    with torch.no_grad():
        for mb in batches:
            n = mb.ids.numel()
            vals = torch.zeros(n, n_directions, dtype=dtype, device=device)
            group = torch.zeros(n, len(names), dtype=dtype, device=device) if keep_groups else None
            for j, name in enumerate(names):
                caps = mb.captures.get(name)
                if not caps:
                    continue
                module, rule, params = modules[name]
                if ghost is not None and name in ghost.modules:
                    for cap in caps:
                        if cap.complete:
                            part = ghost.dot(name, cap, n)
                            vals += part
                            totals[j] += part.sum(0)
                    continue
                dirs = {pn: directions[id(p)] for pn, p in params.items() if id(p) in directions}
                if not dirs:
                    continue
                for cap in caps:
                    if not cap.complete:
                        continue
                    per_row = rule.dot(module, cap, dirs, theta.get(name))  # [rows, Q]
                    per_sample = per_row.reshape(n, -1, per_row.shape[-1]).sum(1)  # [n, Q]
                    vals += per_sample
                    totals[j] += per_sample.sum(0)
                    if group is not None:
                        group[:, j] += per_sample[:, 0]
            all_ids.append(mb.ids.numpy())
            all_vals.append((vals if per_query else vals[:, 0]).double().cpu().numpy())
            if group is not None:
                all_groups.append(group.double().cpu().numpy())
    return ScoredStep(np.concatenate(all_ids), np.concatenate(all_vals),
                      np.concatenate(all_groups) if all_groups else None, totals.double().cpu().numpy())


def grad_sq_norm(params: Sequence[Tensor]) -> float:
    """``Σ_p |p.grad|²`` in float64 (parameters without a gradient count 0), one host sync."""
    if is_sharded([p.grad for p in params if p.grad is not None]):  # FSDP2: over every rank's shard
        return sharding.grad_sq_norm(params)
    squares = [up(p.grad.detach()).pow(2).sum() for p in params if p.grad is not None]
    if not squares:
        return 0.0
    device = squares[0].device  # one host sync for all parameters (model-parallel safe)
    return float(sum(s.to(device, torch.float64) for s in squares))


def grads_zeroed(params: Sequence[Tensor]) -> bool:
    """Every gradient is None or all zeros (gradients were reset since the last backward)."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return True
    if is_sharded([g for g in grads if g is not None]):  # FSDP2: zero on every rank
        return sharding.grads_zeroed(params)
    return all(g is None or not bool(g.any()) for g in grads)


def gradient_scale(grad_sq_after_backward: float | None, grad_sq_now: float, world_size: int | None,
                   grad_scale=None) -> float:
    """Scalar between the captured contributions and the gradient the optimizer used.

    ``sqrt(|ḡ_used|² / |ḡ_backward|²)`` (gradient clipping and loss-scale unscaling, 1 without
    an end-of-backward reading), divided by a fused optimizer's ``grad_scale`` and by the number
    of data-parallel ranks averaging gradients (``world_size``; None: the initialized
    ``torch.distributed`` world size, else 1).
    """
    world = globals()["world_size"](world_size)
    if grad_sq_after_backward is None:
        ratio = 1.0
    else:
        ratio = math.sqrt(grad_sq_now / grad_sq_after_backward) if grad_sq_after_backward > 0 else 0.0
    if grad_scale is not None:  # fused optimizers unscale inside the kernel
        ratio /= float(torch.as_tensor(grad_scale).float())
    return ratio / world
