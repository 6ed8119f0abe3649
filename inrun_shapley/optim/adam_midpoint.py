"""Adam/AdamW's midpoint pass (docs/math.md §3.2): ``θ_t + Δ(G/2)`` and ``dΔ/dg`` at ``G/2`` for a
whole param group at once, from the state BEFORE the step, as list-wide kernels (the tracker's
hot path, run once the step's gradient is final and before the optimizer changes anything; the
per-parameter :func:`midpoint_step` is the same kernel on one parameter).

Names and conventions as in :mod:`inrun_shapley.optim.adam`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from inrun_shapley.optim.adam import (
    EXP_AVG, EXP_AVG_SQ, STEP, AdamHyper, _bias_corrections, as_float, hyper, update, update_jacobian_diag,
)
from inrun_shapley.optim.base import Workspace, fe_add, fe_addcmul, fe_mul
from inrun_shapley.optim.fused import adam_midpoint_fused

__all__ = ["midpoint_many", "midpoint_step"]


def midpoint_step(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> tuple[Tensor, Tensor]:
    """``(Δ(g/2), dΔ/dg at g/2)`` of one parameter, from its state before the step
    (:func:`midpoint_many` on one parameter)."""
    deltas, jacs = midpoint_many([g], [theta], group, [state_before])
    return deltas[0], jacs[0]


def midpoint_many(grads: list[Tensor], thetas: list[Tensor | None], group: dict, states_before: list[dict],
                  steps: list[float | None] | None = None, plus_theta: bool = False,
                  workspace: Workspace | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """``(Δ(g/2), dΔ/dg at g/2)`` of every parameter of one param group, list-wide, from the
    optimizer state BEFORE the step that uses gradients ``grads``.

    The same numbers as ``update``/``update_jacobian_diag`` at ``g/2``, as multi-tensor
    (``torch._foreach_*``) kernels over the whole list, with no host read: with ``m, v`` the
    moments before the step and ``g'_h`` the effective gradient at ``g/2``,

        m'_h = β1·m + (1-β1)·g'_h          v'_h = β2·v + (1-β2)·g'_h²         s_h = sqrt(v'_h/b2)
        Δ(g/2) = -lr·m'_h/(b1·(s_h+eps))  (AdamW: - lr·λ·θ)
        dΔ/dg  = -sign·lr/b1 · ([(1-β1)·β2·v - (1-β2)·β1·m·g'_h]/b2 + (1-β1)·s_h·eps) / (s_h·(s_h+eps)²)

    (the cancellation-free form of :func:`update_jacobian_diag`; ``(1-β1)/(b1·eps)`` where
    ``v'_h = 0``, see :func:`_midpoint_foreach`). Amsgrad goes through the per-parameter
    functions (exact: its old running maximum is still in the state).

    Args:
        grads: the gradients the step uses (after unscaling and clipping), compute dtype.
        thetas: the parameters before the step (compute dtype; needed with weight decay, and
            with ``plus_theta``).
        group: the param group they share.
        states_before: ``optimizer.state[p]`` before the step, per parameter (``{}`` before the
            first step). Nothing in them is written.
        steps: each state's ``step`` as a host float (read once for the whole model by the
            caller; None entries: no step yet, or read here).
        plus_theta: return ``θ + Δ(g/2)`` instead of ``Δ(g/2)`` (fused: no pass of its own).
        workspace: buffers kept between steps (:class:`~inrun_shapley.optim.base.Workspace`); the
            results then live in it and are valid until the next call with it.

    Returns:
        ``(delta_halves, jacobians)`` (``(theta_halves, jacobians)`` with ``plus_theta``), each
        entry shaped like its gradient.
    """
    h = hyper(group)
    n = len(grads)
    # this step's count: one more than the state's (1 before the first step)
    ts = [(as_float(st[STEP]) if st and STEP in st else 0.0) + 1.0 if steps is None or steps[i] is None
          else steps[i] + 1.0 for i, st in enumerate(states_before)]
    deltas: list = [None] * n
    jacs: list = [None] * n
    buckets: dict[float, list[int]] = {}
    for i in range(n):
        if h.amsgrad:  # the running max enters through a max: elementwise, per parameter
            before = {**states_before[i], STEP: ts[i] - 1.0}
            half = 0.5 * grads[i]
            deltas[i] = update(half, thetas[i], group, before)
            deltas[i] = deltas[i] + thetas[i] if plus_theta else deltas[i]
            jacs[i] = update_jacobian_diag(half, thetas[i], group, before)
        else:
            buckets.setdefault(ts[i], []).append(i)
    fused = workspace is not None and workspace.fused
    for t, idx in buckets.items():
        ds, js = _midpoint_foreach(h, t, [grads[i] for i in idx], [thetas[i] for i in idx],
                                   [states_before[i] for i in idx], plus_theta,
                                   workspace if len(buckets) == 1 else None, fused)
        for k, i in enumerate(idx):
            deltas[i], jacs[i] = ds[k], js[k]
    return deltas, jacs


def _midpoint_foreach(h: AdamHyper, t: float, g: list[Tensor], theta: list[Tensor | None], states: list[dict],
                      plus_theta: bool = False, workspace: Workspace | None = None,
                      fused: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`midpoint_many` for parameters whose step has count ``t`` (no amsgrad).

    Few passes over memory (this runs every step: 13 list-wide passes, two more with Adam's L2
    decay): ``g/2`` is folded into the scalars (exact: a power of two),
    and so are ``β1``, ``β2`` and the bias corrections: with ``α = sqrt(β2/b2)`` the kernels
    compute ``u = sqrt(v'_h/β2)`` (``s_h = α·u``) and ``m'_h/β1``, so that neither moment is
    scaled by a pass of its own. ``Δ`` is added to ``θ`` in one ``addcdiv``. ``v'_h = 0`` (no
    gradient, no history) is handled by flooring ``u`` at a value far below ``eps/α``'s rounding:
    there the bracket is exactly 0 but for the floored ``(1-β1)·s_h·eps`` term, so
    ``dΔ/dg = -s·lr·(1-β1)/(b1·eps)`` comes out exactly and ``s_h + eps`` is unchanged.

    ``fused`` (with ``plus_theta``): the same arithmetic as one compiled kernel
    (:mod:`~inrun_shapley.optim.fused`), reading each input once.
    """
    fe = torch
    ws = (lambda name: None) if workspace is None else (lambda name: workspace.get(name, g))
    bc1, bc2 = _bias_corrections(h, t)
    b1, b2 = h.beta1, h.beta2
    alpha = (b2 / bc2) ** 0.5
    dtype = g[0].dtype
    tiny = torch.finfo(dtype).tiny
    gs = fe._foreach_neg(g) if h.maximize else g
    if h.l2 != 0:  # g'_h = s·g/2 + λ·θ
        g_half, half = fe._foreach_mul(gs, 0.5), 1.0
        fe._foreach_add_(g_half, theta, alpha=h.l2)
    else:  # g'_h = s·g/2: the 1/2 goes into the scalars (exact)
        g_half, half = gs, 0.5
    if t <= 1.0 or not states[0]:  # nothing before the first step (a bucket shares its count)
        m, v = [torch.zeros_like(x) for x in g], [torch.zeros_like(x) for x in g]  # distinct: one compiled form
    else:
        m = [st[EXP_AVG].to(dtype) for st in states]
        v = [st[EXP_AVG_SQ].to(dtype) for st in states]
    # u = sqrt(v'_h/β2) = sqrt(v + (1-β2)/β2·g'_h²), floored (see above); s_h = α·u
    floor = 4.0 * tiny * max(alpha * alpha, 1.0) / h.eps**2 if h.eps > 0 else tiny  # eps = 0: torch divides by 0
    decay = h.decoupled and h.weight_decay != 0
    keep = 1.0 - h.lr * h.weight_decay if decay else 1.0
    k = -h.sign * h.lr / bc1  # the Jacobian's factor; over s_h·(s_h+eps)² = α³·u·d²
    a3 = alpha**3
    c_v, c_m, step_scale = (1.0 - b2) / b2 * half * half, (1.0 - b1) / b1 * half, -h.lr * b1 / (bc1 * alpha)
    j_v, j_mg, j_u = k * (1.0 - b1) * b2 / (bc2 * a3), -k * (1.0 - b2) * b1 * half / (bc2 * a3), k * (1.0 - b1) * h.eps / alpha**2
    if fused and plus_theta:
        out_theta = ws("theta_half") or [torch.empty_like(x, memory_format=torch.contiguous_format) for x in g]
        out_jac = ws("mh") or [torch.empty_like(x, memory_format=torch.contiguous_format) for x in g]
        if adam_midpoint_fused(g_half, m, v, theta, out_theta, out_jac,
                               [c_v, c_m, h.eps / alpha, floor, keep, step_scale, j_v, j_mg, j_u]):
            return out_theta, out_jac
    u = fe_addcmul(v, g_half, g_half, value=c_v, out=ws("u"))
    fe._foreach_sqrt_(u)
    fe._foreach_clamp_min_(u, floor)
    d = fe_add(u, h.eps / alpha, out=ws("d"))  # (s_h + eps)/α
    mh = fe_add(m, g_half, alpha=c_m, out=ws("mh"))  # m'_h/β1
    if plus_theta:  # θ + Δ(g/2) = θ·(1 - lr·λ) - lr/b1 · m'_h/(s_h + eps)
        out = fe_mul(theta, keep, out=ws("theta_half"))
        fe._foreach_addcdiv_(out, mh, d, value=step_scale)
    else:
        out = fe._foreach_div(mh, d)
        fe._foreach_mul_(out, step_scale)
        if decay:
            fe._foreach_add_(out, theta, alpha=-h.lr * h.weight_decay)
    # the Jacobian's numerator, written over m'_h (ours: a buffer or fresh)
    num = fe_mul(v, j_v, out=mh)
    fe._foreach_addcmul_(num, m, g_half, value=j_mg)
    fe._foreach_add_(num, u, alpha=j_u)
    fe._foreach_mul_(d, d)
    fe._foreach_mul_(d, u)
    fe._foreach_div_(num, d)
    return out, num
