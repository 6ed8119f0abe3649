"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``): every DTensor concern of the engine.

Under FSDP2 a parameter, its gradient and its optimizer state are DTensors sharded on dim 0 (a
rank holds rows ``[r·⌈n/W⌉, (r+1)·⌈n/W⌉)`` of each, its *local shard*). The tracker needs:

* **elementwise step math on local shards, no communication.** :class:`ShardedAdapter` hands the
  optimizer adapter plain local tensors (parameter, gradient, Adam/SGD state) and wraps what it
  returns back into DTensors of the parameter's layout, so the engine's own elementwise work
  (``θ_t + Δ(G/2)``, ``M = -J ⊙ g_val``) stays local too (DTensor elementwise ops do not
  communicate);
* **a collective validation pass.** :class:`ShardedValidation` splits the step's validation rows
  over the ranks, runs each rank's part forward and backward *through FSDP* (which all-gathers
  the weights and reduce-scatters the gradient, exactly as for training), and reads the reduced
  validation gradient's local shard from ``.grad``; the parameters are moved to the evaluation
  point and back in place, and every ``.grad`` is restored, bit for bit;
* **full directions to score a rank's own samples.** :func:`score_sharded` all-gathers ``M`` one
  tracked layer at a time (peak memory: one layer's full ``M``), scores the rank's captured
  micro-batches through the ordinary capture rules, and frees it before the next layer;
* **global norms.** :func:`grad_sq_norm` and :func:`grads_zeroed` reduce the per-shard figures
  over the ranks (a DTensor's partial sum read as a float is only the local part).

Communication per optimizer step added by the tracker (``P`` = tracked parameter count, ``W``
ranks, fp32; docs/architecture.md "Sharded training"): the validation pass costs one FSDP
forward + backward (all-gather ``2·P·4·(W-1)/W`` bytes received, reduce-scatter ``P·4·(W-1)/W``),
and gathering ``M`` ``P·4·(W-1)/W`` bytes, plus a few scalars. Every function here is collective:
all ranks call it in the same order (the tracker's step hooks guarantee this).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from inrun_shapley.capture.registry import up
from inrun_shapley.engine.validation import ValidationObjective, eval_mode
from inrun_shapley.engine.sharding_checks import check_sharded, refuse_unsupported  # noqa: F401  (hook points)
from inrun_shapley.errors import ConfigurationError

__all__ = ["ShardedAdapter", "ShardedValidation", "UnshardedLookup", "check_sharded", "grad_sq_norm", "grads_zeroed",
           "is_sharded", "refuse_unsupported", "score_sharded", "unsharded_lookup"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(tensors: Sequence[Tensor] | Tensor) -> bool:
    """Whether ``tensors`` (one tensor or a sequence) hold a DTensor (FSDP2 / ``fully_shard``)."""
    dt = _dtensor_type()
    if dt is None:
        return False
    if isinstance(tensors, Tensor):
        return isinstance(tensors, dt)
    return any(isinstance(t, dt) for t in tensors)


def _local(x: Any) -> Any:
    """A DTensor's local shard (a view, no copy); dicts and tuples mapped; anything else as is."""
    dt = _dtensor_type()
    if dt is not None and isinstance(x, dt):
        return x.to_local()
    if isinstance(x, dict):
        return {k: _local(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_local(v) for v in x)
    return x


def _like(local: Any, ref: Tensor) -> Any:
    """``local`` (a shard-shaped tensor) as a DTensor with ``ref``'s layout; other values as is."""
    if not isinstance(local, Tensor) or local.dim() == 0:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def _full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (one all-gather for a DTensor); a plain tensor as is."""
    return t.full_tensor() if is_sharded(t) else t


class ShardedAdapter:
    """An optimizer adapter run on local shards: DTensor arguments in, DTensor results out.

    The adapter's math is elementwise (docs/math.md §3), so a shard of the result is the
    result of the shards: no communication. What ``before_step`` returns is
    kept local (it only goes back into the adapter).
    """

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def before_step(self, group: dict, state: dict) -> dict:
        return self.inner.before_step(group, _local(state))

    def midpoint_step(self, g, theta, group, state_before):
        delta, jac = self.inner.midpoint_step(_local(g), _local(theta), group, _local(state_before))
        return _like(delta, g), _like(jac, g)

    def midpoint_many(self, grads, thetas, group, states_before, steps=None, plus_theta=False, workspace=None):
        deltas, jacs = self.inner.midpoint_many(_local(grads), _local(thetas), group, _local(states_before), steps,
                                                plus_theta=plus_theta, workspace=workspace)
        return [_like(d, g) for d, g in zip(deltas, grads)], [_like(j, g) for j, g in zip(jacs, grads)]

    def terms(self, grad, group, state, before, theta, need_drift, need_loo):
        t = self.inner.terms(_local(grad), group, _local(state), _local(before), _local(theta),
                             need_drift=need_drift, need_loo=need_loo)
        for field in ("precond", "drift", "loo_precond", "jacobian"):
            if getattr(t, field, None) is not None:
                setattr(t, field, _like(getattr(t, field), grad))
        return t


# ----------------------------------------------------------------- norms
def _reduce_sum(local: Tensor) -> Tensor:
    """Sum of ``local`` (a float64 tensor) over every rank of the default process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local)
    return local


def grad_sq_norm(params: Sequence[Tensor]) -> Tensor:
    """``Σ_p |p.grad|²`` over every shard of every rank, a float64 0-d tensor on the gradients'
    device (one all-reduce, no host read).

    Assumes pure data-parallel sharding (every parameter sharded over the whole default group,
    as ``fully_shard`` on one mesh dimension does).
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else params[0].device
    local = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        local += up(_local(g.detach())).to(torch.float64).pow(2).sum()
    return _reduce_sum(local)


def grads_zeroed(params: Sequence[Tensor], lookup: UnshardedLookup | None = None) -> bool:
    """Every gradient is None or all zeros on every rank, unreduced ones FSDP holds included
    (``lookup``); one all-reduce unless none exists on this rank."""
    grads = [p.grad for p in params] + ([lookup.unsynced(p) for p in params] if lookup is not None else [])
    present = [g for g in grads if g is not None]
    if not present:
        return True
    nonzero = torch.zeros((), dtype=torch.float64, device=present[0].device)
    for g in present:
        nonzero += _local(g.detach()).count_nonzero().to(torch.float64)
    return float(_reduce_sum(nonzero)) == 0.0


# ------------------------------------------------------------ validation
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedValidation:
    """The validation gradient of a sharded model, computed collectively through FSDP.

    At step ``t`` the rows of ``validation.indices(t)`` are split into ``W`` contiguous parts;
    rank ``r`` runs part ``r`` in chunks of ``validation.batch_size`` (every rank the same
    number of chunks: a rank whose part ran out runs one row at weight 0, since FSDP's forward
    is collective). Each chunk's loss is weighted ``W·rows/total`` of its mean, so FSDP's
    averaging reduce-scatter leaves, in ``.grad``, the local shard of ``∇L_val`` of the whole set.

    Args:
        validation: the single-process objective (data, loss function, sampling, batch size).
    """

    def __init__(self, validation: ValidationObjective):
        self.inner = validation

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def __len__(self) -> int:
        return len(self.inner)

    def _my_chunks(self, step: int):
        rank, world = _rank_world()
        idx = self.inner.indices(step)
        parts = idx.tensor_split(world)
        bs = self.inner.batch_size
        n_chunks = max(1, -(-max(len(p) for p in parts) // bs))
        mine = parts[rank]
        for c in range(n_chunks):
            part = mine[c * bs:(c + 1) * bs]
            if len(part):
                yield self.inner._rows(part), len(part), len(idx)
            else:  # keep step with the other ranks' collectives
                yield self.inner._rows(idx[:1]), 0, len(idx)

    def gradient(self, model: nn.Module, params: Sequence[Tensor], step: int, hvp_vectors=None,
                 at: Sequence[Tensor] | None = None, point=None, flags: list | None = None):
        """``(grads, None)``: ``∇L_val`` at ``at`` (or the current parameters) as DTensors shaped
        and sharded like ``params`` (fp32 or wider), zeros for parameters the loss does not use.

        The model's parameters are written in place to ``at`` for the pass and restored; every
        parameter's ``.grad`` is put back as it was.

        Raises:
            ConfigurationError: ``hvp_vectors`` or ``point`` (not available sharded).
        """
        if hvp_vectors is not None or point is not None:
            raise ConfigurationError("under FSDP the validation pass computes first-order gradients only")
        _, world = _rank_world()
        every = list(model.parameters())
        with _parameters_at(params, at), _grads_set_aside(every):
            ctx = eval_mode(model) if self.inner.use_eval_mode else _null()
            device = params[0].device
            with ctx, torch.enable_grad():
                for batch, rows, total in self._my_chunks(step):
                    losses = self.inner.per_sample_losses(model, batch, device, flags=flags)
                    if losses.dim() == 0:
                        piece = losses * (world * rows / total)
                    else:
                        piece = up(losses).sum() * (world / total if rows else 0.0)
                    piece.backward()
            grads = [up(torch.zeros_like(p.detach())) if p.grad is None else up(p.grad.detach()) for p in params]
        return grads, None


@contextmanager
def _parameters_at(params: Sequence[Tensor], at: Sequence[Tensor] | None):
    """Parameters written (in place, local shards) to ``at`` inside the block, then restored."""
    if at is None:
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, a in zip(params, at):
            p.copy_(a)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextmanager
def _grads_set_aside(params: Sequence[Tensor]):
    """Every ``.grad`` set to None inside the block (so a backward does not accumulate), then put back."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


@contextmanager
def _null():
    yield


# --------------------------------------------------------------- scoring
@contextmanager
def _without_forward_hooks(module: nn.Module):
    """The module's (and its children's) forward hooks set aside inside the block.

    A rule that replays a module (the JVP rule) passes it the gathered parameters through
    ``functional_call``; if the module is itself an FSDP unit, FSDP's pre-forward hook would
    all-gather and put its own parameters back in their place (inside one rank's loop). The
    tracker's capture hooks are suspended while scoring anyway.
    """
    stash = [(m, m._forward_pre_hooks, m._forward_hooks) for m in module.modules()]
    for m, _, _ in stash:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    try:
        yield
    finally:
        for m, pre, post in stash:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def score_sharded(batches, modules, directions: Mapping[int, Tensor], *, theta, ghost=None, n_directions: int,
                  per_query: bool, keep_groups: bool, device, dtype):
    """:func:`~inrun_shapley.engine.scoring.score_micro_batches` with sharded directions.

    One tracked module at a time, on every rank in the same order: its directions are
    all-gathered (``full_tensor``), the rank's own micro-batches are scored through the
    module's capture rule, and the gathered directions are freed. Same arguments and result.
    """
    from inrun_shapley.engine.scoring import ScoredStep, score_micro_batches

    if ghost is not None:
        raise ConfigurationError("the ghost path is not available under FSDP (fully_shard)")
    total = None
    for j, (name, tracked) in enumerate(modules.items()):
        dirs = {id(p): _full(directions[id(p)]) for p in tracked.params.values() if id(p) in directions}
        th = {name: {pn: _full(v) for pn, v in theta[name].items()}} if name in theta else {}
        with _without_forward_hooks(tracked.module) if tracked.rule.reads_parameters else _null():
            part = score_micro_batches(batches, {name: tracked}, dirs, theta=th, n_directions=n_directions,
                                       per_query=per_query, keep_groups=keep_groups, device=device, dtype=dtype)
        del dirs, th
        if total is None:  # device tensors (engine/step_io.py reads the step once)
            groups = None if part.groups is None else part.groups.new_zeros(part.groups.shape[0], len(modules))
            totals = part.module_totals.new_zeros(len(modules), part.module_totals.shape[1])
            total = ScoredStep(part.ids, torch.zeros_like(part.values), groups, totals)
        total.values += part.values
        if total.groups is not None:
            total.groups[:, j] = part.groups[:, 0]
        total.module_totals[j] = part.module_totals[0]
    return total


class UnshardedLookup:
    """FSDP2's own records of the sharded parameters of ``model``.

    ``lookup(p)``: the full (unsharded) parameter FSDP2 puts in place of the sharded ``p`` while
    its group is unsharded (what a module's forward hook sees), None if unknown.
    ``lookup.unsynced(p)``: a gradient FSDP holds unreduced for ``p`` (accumulation with
    ``set_requires_gradient_sync(False)``), which ``p.grad`` does not show yet.
    """

    def __init__(self, model: nn.Module):
        self._by_id = {}
        for module in model.modules():
            state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
            group = getattr(state, "_fsdp_param_group", None)
            for fp in getattr(group, "fsdp_params", ()) or ():
                self._by_id[id(fp.sharded_param)] = fp

    def __call__(self, p: Tensor):
        fp = self._by_id.get(id(p))
        return None if fp is None else getattr(fp, "_unsharded_param", None)

    def unsynced(self, p: Tensor) -> Tensor | None:
        fp = self._by_id.get(id(p))
        if fp is None:
            return None
        acc = getattr(fp, "unsharded_accumulated_grad", None)
        full = getattr(fp, "_unsharded_param", None)
        return acc if acc is not None else getattr(full, "grad", None)


unsharded_lookup = UnshardedLookup
