"""Scoring: each captured call dotted with the step's directions, summed per sample (and group).

Pure functions of the captures, the directions and the tracked modules: no tracker state.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from inrun_shapley.capture.registry import up
from inrun_shapley.engine import sharding
from inrun_shapley.engine.capture_session import MicroBatch
from inrun_shapley.engine.sharding import is_sharded
from inrun_shapley.engine.tracked import TrackedModule
from inrun_shapley.host_reads import declared_read

__all__ = ["ScoredStep", "captured_in_half", "grad_sq_norm", "grads_zeroed",
           "score_micro_batches", "world_size"]


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
    """One step's values, on the device, in the compute dtype: ``ids [n]`` int64 (host),
    ``values [n, Q]``, ``groups [n, G]`` (per tracked module) or None, and ``module_totals
    [G, Q]`` (each tracked module's part of the step's sum). Values are not yet scaled."""

    def __init__(self, ids: Tensor, values: Tensor, groups: Tensor | None, module_totals: Tensor):
        self.ids, self.values, self.groups, self.module_totals = ids, values, groups, module_totals


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
    """``value[i, q] = Σ_modules Σ_calls <c_i, M[q]>`` for every sample of every micro-batch, into
    one values tensor on the device (no host read).

    Args:
        batches: the step's micro-batches, in order.
        modules: ``{name: TrackedModule}`` (group order of ``groups``).
        directions: ``{id(param): M [Q, *shape]}``; parameters without one contribute nothing.
        theta: ``{module name: {param name: value before the step}}`` for rules that read
            parameters.
        ghost: a prepared :class:`~inrun_shapley.engine.queries.GhostQueries` scoring its
            modules, or None.
        n_directions: ``Q``.
        per_query: keep ``[n, Q]`` values (else ``Q = 1``).
        keep_groups: also return the per-module split (``Q = 1`` only).
        device, dtype: where and in which dtype the values are summed.

    Returns:
        the step's :class:`ScoredStep`, samples in micro-batch order (values not yet scaled).
    """
    names = list(modules)
    sizes = [mb.ids.numel() for mb in batches]
    n_all = sum(sizes)
    values = torch.zeros(n_all, n_directions, dtype=dtype, device=device)
    groups = torch.zeros(n_all, len(names), dtype=dtype, device=device) if keep_groups else None
    totals = torch.zeros(len(names), n_directions, dtype=dtype, device=device)
    dirs_of = {name: {pn: directions[id(p)] for pn, p in modules[name].params.items() if id(p) in directions}
               for name in names}
    with torch.no_grad():
        start = 0
        for mb, n in zip(batches, sizes):
            vals = values[start:start + n]
            group = None if groups is None else groups[start:start + n]
            start += n
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
                dirs = dirs_of[name]
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
    ids = torch.cat([mb.ids for mb in batches]) if len(batches) != 1 else batches[0].ids
    return ScoredStep(ids, values, groups, totals)


def grad_sq_norm(params: Sequence[Tensor]) -> Tensor | None:
    """``Σ_p |p.grad|²`` as a float64 0-d tensor on the first gradient's device (None without
    gradients): one list-wide norm per device and dtype, no host read."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    if is_sharded(grads):  # FSDP2: over every rank's shard (one all-reduce)
        return sharding.grad_sq_norm(params)
    device = grads[0].device
    by_kind: dict[tuple, list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (_, dtype), gs in by_kind.items():
        norms = torch._foreach_norm(gs, 2, dtype=up(gs[0]).dtype)
        total = total + torch.stack(norms).to(device, torch.float64).square().sum()
    return total


def grads_zeroed(params: Sequence[Tensor]) -> bool:
    """Every gradient is None or all zeros (gradients were reset since the last backward); one
    host read."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return True
    if is_sharded(grads):  # FSDP2: zero on every rank
        return sharding.grads_zeroed(params)
    device = grads[0].device
    with declared_read():
        return not bool(torch.stack([g.any().to(device) for g in grads]).any())
