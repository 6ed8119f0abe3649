"""Adam/AdamW's midpoint pass (docs/math.md §3.2): ``θ_t + Δ(G/2)`` and ``dΔ/dg`` at ``G/2`` for a
whole param group at once, from the state after the step, as list-wide kernels (the tracker's
hot path; the per-parameter :func:`midpoint_step` is the same kernel on one parameter).

Names and conventions as in :mod:`inrun_shapley.optim.adam`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from inrun_shapley.optim.adam import (
    EXP_AVG, EXP_AVG_SQ, STEP, AdamHyper, _bias_corrections, as_float, hyper, state_before_step, update,
    update_jacobian_diag,
)
from inrun_shapley.optim.base import Workspace, fe_add, fe_addcmul, fe_mul

__all__ = ["midpoint_many", "midpoint_step"]


def midpoint_step(g: Tensor, theta: Tensor | None, group: dict, state_after: dict,
                  snapshot: dict | None = None, before: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(Δ(g/2), dΔ/dg at g/2)`` of one parameter, from the state AFTER a step that used ``g``
    (:func:`midpoint_many` on one parameter; args as there, one of each)."""
    deltas, jacs = midpoint_many([g], [theta], group, [state_after], [snapshot])
    return deltas[0], jacs[0]


def midpoint_many(grads: list[Tensor], thetas: list[Tensor | None], group: dict, states_after: list[dict],
                  snapshots: list[dict | None] | None = None, befores: list | None = None,
                  steps: list[float] | None = None, plus_theta: bool = False,
                  workspace: Workspace | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """``(Δ(g/2), dΔ/dg at g/2)`` of every parameter of one param group, list-wide, from the state
    AFTER a step that used gradients ``grads``.

    The same numbers as ``update``/``update_jacobian_diag`` at ``g/2`` on the state before the
    step (reconstructed as in :func:`state_before_step`), as multi-tensor (``torch._foreach_*``)
    kernels over the whole list, with no host read: with ``A = β2·v = max(0, v_t - (1-β2)·g'²)``,
    ``B = β1·m = m_t - (1-β1)·g'`` and ``g'_h`` the effective gradient at ``g/2``,

        m'_h = B + (1-β1)·g'_h            v'_h = A + (1-β2)·g'_h²         s_h = sqrt(v'_h/b2)
        Δ(g/2) = -lr·m'_h/(b1·(s_h+eps))  (AdamW: - lr·λ·θ)
        dΔ/dg  = -sign·lr/b1 · ([(1-β1)·A - (1-β2)·B·g'_h]/b2 + (1-β1)·s_h·eps) / (s_h·(s_h+eps)²)

    (the cancellation-free form of :func:`update_jacobian_diag`; ``(1-β1)/(b1·eps)`` where
    ``v'_h = 0``: there ``A = g'_h = 0``, the bracket is exactly 0 and ``s_h + eps = eps``;
    see :func:`_midpoint_foreach` for how that case is computed without a host read).

    Args:
        grads: the gradients the step used (after unscaling and clipping), compute dtype.
        thetas: the parameters before the step (compute dtype; needed with weight decay).
        group: the param group they share.
        states_after: ``optimizer.state[p]`` after the step, per parameter.
        snapshots: :func:`snapshot_state` taken before the step per parameter (exact; needed for
            amsgrad's old maximum), or None entries to reconstruct.
        befores: unused (the SGD family's pre-hook record; same signature).
        steps: each state's ``step`` as a host float (read once for the whole model by the
            caller), or None to read it here.
        plus_theta: return ``θ + Δ(g/2)`` instead of ``Δ(g/2)`` (fused: one pass fewer).
        workspace: buffers kept between steps (:class:`~inrun_shapley.optim.base.Workspace`); the
            results then live in it and are valid until the next call with it.

    Returns:
        ``(delta_halves, jacobians)`` (``(theta_halves, jacobians)`` with ``plus_theta``), each
        entry shaped like its gradient.
    """
    h = hyper(group)
    n = len(grads)
    ts = [as_float(st[STEP]) if steps is None or steps[i] is None else steps[i] for i, st in enumerate(states_after)]
    deltas: list = [None] * n
    jacs: list = [None] * n
    buckets: dict[float, list[int]] = {}
    for i in range(n):
        snap = snapshots[i] if snapshots else None
        if snap is not None or h.amsgrad:  # the exact pre-step state: elementwise, per parameter
            after = {**states_after[i], STEP: ts[i]}
            before = {**snap, STEP: ts[i] - 1.0} if snap else snap
            before = before if before is not None else state_before_step(after, grads[i], thetas[i], group)
            half = 0.5 * grads[i]
            deltas[i] = update(half, thetas[i], group, before)
            deltas[i] = deltas[i] + thetas[i] if plus_theta else deltas[i]
            jacs[i] = update_jacobian_diag(half, thetas[i], group, before)
        else:
            buckets.setdefault(ts[i], []).append(i)
    for t, idx in buckets.items():
        ds, js = _midpoint_foreach(h, t, [grads[i] for i in idx], [thetas[i] for i in idx],
                                   [states_after[i] for i in idx], plus_theta,
                                   workspace if len(buckets) == 1 else None)
        for k, i in enumerate(idx):
            deltas[i], jacs[i] = ds[k], js[k]
    return deltas, jacs


def _midpoint_foreach(h: AdamHyper, t: float, g: list[Tensor], theta: list[Tensor | None], states: list[dict],
                      plus_theta: bool = False, workspace: Workspace | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`midpoint_many` for parameters sharing a step count ``t`` (no amsgrad, no snapshot).

    Few passes over memory (this runs every step): ``g/2`` is folded into the scalars (exact:
    a power of two), ``Δ`` is added to ``θ`` in one ``addcdiv``, the Jacobian's scalars are
    folded into its numerator, and ``v'_h = 0`` (no gradient, no history) is handled by
    flooring ``s_h`` at ``f = 4·tiny/eps²``: there the bracket is exactly 0 but for the floored
    ``(1-β1)·f·eps`` term, so ``dΔ/dg = -s·lr·(1-β1)/(b1·eps)`` comes out exactly, and ``d = s_h + eps``
    is unchanged (``f`` is far below eps's rounding). Only ``0 < s_h < f`` (gradients and
    moments below ~1e-21 in float32) would read differently from the unfloored formula.
    """
    fe = torch
    ws = (lambda name: None) if workspace is None else (lambda name: workspace.get(name, g))
    bc1, bc2 = _bias_corrections(h, t)
    b1, b2 = h.beta1, h.beta2
    dtype = g[0].dtype
    tiny = torch.finfo(dtype).tiny
    floor = 4.0 * tiny / h.eps**2 if h.eps > 0 else tiny  # eps = 0: torch's own step divides by 0 there
    gs = fe._foreach_neg(g) if h.maximize else g
    if h.l2 != 0:
        g_eff = fe_add(gs, theta, alpha=h.l2)  # g' of the real step
        g_half, half = fe._foreach_mul(gs, 0.5), 1.0
        fe._foreach_add_(g_half, theta, alpha=h.l2)
    else:  # g'_h = g'/2: the 1/2 goes into the scalars (exact)
        g_eff, g_half, half = gs, gs, 0.5
    if t <= 1.0:  # nothing before the first step
        a, bm = ws("a") or [torch.empty_like(x) for x in g], ws("bm") or [torch.empty_like(x) for x in g]
        fe._foreach_zero_(a)
        fe._foreach_zero_(bm)
        m_h = fe_mul(g_half, (1.0 - b1) * half, out=ws("m_h"))
    else:
        a = fe_addcmul([st[EXP_AVG_SQ].to(dtype) for st in states], g_eff, g_eff, value=-(1.0 - b2), out=ws("a"))
        fe._foreach_clamp_min_(a, 0.0)
        bm = fe_add([st[EXP_AVG].to(dtype) for st in states], g_eff, alpha=-(1.0 - b1), out=ws("bm"))
        m_h = fe_add(bm, g_half, alpha=(1.0 - b1) * half, out=ws("m_h"))
    s_h = fe_addcmul(a, g_half, g_half, value=(1.0 - b2) * half * half, out=ws("s_h"))  # v'_h, then s_h in place
    fe._foreach_div_(s_h, bc2)
    fe._foreach_sqrt_(s_h)
    fe._foreach_clamp_min_(s_h, floor)
    d = fe_add(s_h, h.eps, out=ws("d"))
    decay = h.decoupled and h.weight_decay != 0
    if plus_theta:  # θ + Δ(g/2) = θ·(1 - lr·λ) - lr/b1 · m'_h/d
        out = fe_mul(theta, 1.0 - h.lr * h.weight_decay if decay else 1.0, out=ws("theta_half"))
        fe._foreach_addcdiv_(out, m_h, d, value=-h.lr / bc1)
    else:
        out = m_h if workspace is None else [x.clone() for x in m_h]
        fe._foreach_div_(out, d)
        fe._foreach_mul_(out, -h.lr / bc1)
        if decay:
            fe._foreach_add_(out, theta, alpha=-h.lr * h.weight_decay)
    del m_h
    # Jacobian, with k = -s·lr/b1 folded in: numerator in place on ``a``, denominator on ``d``
    k = -h.sign * h.lr / bc1
    fe._foreach_mul_(a, k * (1.0 - b1) / bc2)
    fe._foreach_addcmul_(a, bm, g_half, value=-k * (1.0 - b2) * half / bc2)
    fe._foreach_add_(a, s_h, alpha=k * (1.0 - b1) * h.eps)
    fe._foreach_mul_(d, d)
    fe._foreach_mul_(d, s_h)
    fe._foreach_div_(a, d)
    return out, a
