"""``torch.optim.Adam`` and ``AdamW``: the step as pure functions, and the adapter the tracker uses.

Amsgrad, maximize, L2 (Adam) or decoupled (AdamW) weight decay; the foreach, fused and
capturable implementations keep the same state and make the same step up to rounding.

torch's step at count ``t`` (the state's ``step`` after the step), ``s = -1`` under maximize
else 1, weight decay λ::

    g' = s·g + λ·θ_t                          (L2; AdamW decays θ_t ← (1 - lr·λ)·θ_t instead)
    m' = β1·m + (1-β1)·g'                     v' = β2·v + (1-β2)·g'²
    v_used = v'                               (amsgrad: max(max_exp_avg_sq, v'))
    D = sqrt(v_used/b2) + eps                 b1 = 1-β1^t, b2 = 1-β2^t
    Δ = θ_{t+1} - θ_t = -lr·(m'/b1)/D         (AdamW: - lr·λ·θ_t as well)

Its elementwise derivative in g (docs/math.md §3)::

    dΔ/dg = -s·lr/b1 · [ (1-β1)/D - m'·(1-β2)·g' / (b2·sqrt(v_used/b2)·D²) ]

with the second term 0 where ``v_used = 0`` and, with amsgrad, where the old maximum is larger
than ``v'`` (the derivative goes through the max).

Freezing ``v_used`` makes the step affine in g (the tracker's :class:`StepTerms`, docs/math.md §2):
``P = 1/D``, ``k = (1-β1)/b1``, ``d0 = -lr·P ⊙ (β1·m + (1-β1)·λθ_t)/b1`` (Adam) or
``-lr·P ⊙ β1·m/b1 - lr·λ·θ_t`` (AdamW). The leave-one-out Jacobian ``J`` is ``dΔ/dg'`` divided
by ``-lr``: ``J = k·P - m̂ ⊙ ((1-β2)·g'/b2) / (sqrt(v̂)·(sqrt(v̂)+eps)²)``.

State names are torch's (:data:`STATE_KEYS`, ``step``): a "state" below is a dict like
``optimizer.state[p]``. Hyperparameters are read from the param group by :func:`hyper` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inrun_shapley.optim.base import StepTerms, as_float, register_adapter

STEP = "step"
EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = "exp_avg", "exp_avg_sq", "max_exp_avg_sq"
STATE_KEYS = (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ)
"""torch's per-parameter tensors of Adam's state (``max_exp_avg_sq`` only with amsgrad)."""


@dataclass(frozen=True)
class AdamHyper:
    """An Adam/AdamW param group's hyperparameters as plain floats and flags."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool

    @property
    def sign(self) -> float:
        """-1 under ``maximize`` (torch negates the gradient), else 1."""
        return -1.0 if self.maximize else 1.0

    @property
    def l2(self) -> float:
        """The coupled (L2) decay λ that enters the gradient: Adam's ``weight_decay``, 0 for AdamW."""
        return 0.0 if self.decoupled else self.weight_decay


def hyper(group: dict) -> AdamHyper:
    """Read an Adam/AdamW param group (``lr``, ``betas``, ... may be floats or 0-d tensors)."""
    beta1, beta2 = group["betas"]
    return AdamHyper(
        lr=as_float(group["lr"]), beta1=as_float(beta1), beta2=as_float(beta2), eps=as_float(group["eps"]),
        weight_decay=as_float(group["weight_decay"]),
        decoupled=bool(group.get("decoupled_weight_decay", False)),
        amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group.get("maximize", False)),
    )


def effective_gradient(g: Tensor, theta: Tensor | None, h: AdamHyper) -> Tensor:
    """``g' = s·g + λ·θ`` (L2 decay only), the gradient the moments consume."""
    g_eff = -g if h.maximize else g
    if h.l2 != 0:
        if theta is None:
            raise ValueError("theta is needed for Adam's L2 weight decay term")
        g_eff = g_eff + h.l2 * theta
    return g_eff


@dataclass
class _Step:
    """The quantities of one step computed from the state before it."""

    h: AdamHyper
    t: float  # the step count of this step (1 for the first)
    g_eff: Tensor
    m_new: Tensor
    v_new: Tensor
    v_used: Tensor  # v_new, or the new running max with amsgrad


def _step(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> _Step:
    h = hyper(group)
    g_eff = effective_gradient(g, theta, h)
    t = as_float(state_before.get(STEP, 0.0)) + 1.0
    m = state_before.get(EXP_AVG)
    v = state_before.get(EXP_AVG_SQ)
    m_new = g_eff * (1.0 - h.beta1) if m is None else torch.lerp(m.to(g_eff.dtype), g_eff, 1.0 - h.beta1)
    v_new = (1.0 - h.beta2) * g_eff * g_eff
    if v is not None:
        v_new = v.to(g_eff.dtype) * h.beta2 + v_new
    v_used = v_new
    if h.amsgrad:
        v_max = state_before.get(MAX_EXP_AVG_SQ)
        if v_max is not None:
            v_used = torch.maximum(v_max.to(g_eff.dtype), v_new)
    return _Step(h, t, g_eff, m_new, v_new, v_used)


def _bias_corrections(h: AdamHyper, t: float) -> tuple[float, float]:
    return 1.0 - h.beta1**t, 1.0 - h.beta2**t


def update(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> Tensor:
    """The parameter change ``Δ = θ_{t+1} - θ_t`` torch's Adam/AdamW step makes from gradient ``g``.

    Args:
        g: the gradient the optimizer uses (after unscaling and clipping), shaped like the
            parameter.
        theta: the parameter before the step, same shape (may be None without weight decay).
        group: the parameter's param group (torch's keys).
        state_before: the parameter's optimizer state before the step (torch's keys ``step``,
            ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``); ``{}`` before the first step.

    Returns:
        ``Δ``, shaped like ``g``, in parameter units. Elementwise in ``g`` and differentiable.
    """
    st = _step(g, theta, group, state_before)
    h = st.h
    bc1, bc2 = _bias_corrections(h, st.t)
    denom = st.v_used.sqrt() / bc2**0.5 + h.eps
    delta = -(h.lr / bc1) * st.m_new / denom
    if h.decoupled and h.weight_decay != 0:
        delta = delta - (h.lr * h.weight_decay) * theta
    return delta


def _loo_correction(st: _Step, sqrt_v_hat: Tensor, bc1: float, bc2: float) -> Tensor:
    """``m̂ ⊙ ((1-β2)·g'/b2) / (sqrt(v̂)·(sqrt(v̂)+eps)²)``: the second moment's part of ``-dΔ/dg'/lr``
    (0 where ``v̂ = 0``, and with amsgrad where the old maximum is used)."""
    h = st.h
    m_hat = st.m_new / bc1
    dv = (1.0 - h.beta2) * st.g_eff / bc2
    denom = sqrt_v_hat * (sqrt_v_hat + h.eps) ** 2
    correction = torch.where(denom > 0, m_hat * dv / denom.clamp_min(1e-38), torch.zeros_like(denom))
    if h.amsgrad:  # v only moves with g where the current moment is the max
        correction = torch.where(st.v_new >= st.v_used, correction, 0.0)
    return correction


def update_jacobian_diag(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> Tensor:
    """``dΔ/dg``, the diagonal of the Jacobian of :func:`update` in ``g`` (module docstring).

    Args: as :func:`update`.

    Returns:
        ``dΔ/dg`` shaped like ``g`` (parameter units per gradient unit; negative where a larger
        gradient moves the parameter down, i.e. almost everywhere without maximize).
    """
    st = _step(g, theta, group, state_before)
    h = st.h
    bc1, bc2 = _bias_corrections(h, st.t)
    s = (st.v_used / bc2).sqrt()
    d = s + h.eps
    # The bracket (1-β1)/D - m'(1-β2)g'/(b2·s·D²) cancels badly when g' dominates the moments (at
    # the first step it is eps/D² against 1/D). With m' = β1·m + (1-β1)g' and s² = v'/b2 it equals
    #   ( [(1-β1)·β2·v - β1·(1-β2)·m·g'] / b2 + (1-β1)·s·eps ) / (s·D²)
    # (m, v the moments before the step), which has no cancellation at all.
    m = state_before.get(EXP_AVG)
    v = state_before.get(EXP_AVG_SQ)
    m = torch.zeros_like(st.g_eff) if m is None else m.to(st.g_eff.dtype)
    v = torch.zeros_like(st.g_eff) if v is None else v.to(st.g_eff.dtype)
    numer = ((1.0 - h.beta1) * h.beta2 * v - (h.beta1 * (1.0 - h.beta2)) * m * st.g_eff) / bc2 + (1.0 - h.beta1) * s * h.eps
    stable = numer / (s * d * d).clamp_min(torch.finfo(d.dtype).tiny)
    fixed = (1.0 - h.beta1) / d  # where v_used does not move with g: v_used = 0, or amsgrad's old max
    moves = s > 0
    if h.amsgrad:
        moves = moves & (st.v_new >= st.v_used)
    j = torch.where(moves, stable, fixed) / bc1
    return (-h.sign * h.lr) * j


def update_moment_partials(
    g: Tensor, theta: Tensor | None, group: dict, state_before: dict
) -> tuple[Tensor, Tensor]:
    """``(∂Δ/∂m', ∂Δ/∂v')``: the update's elementwise derivatives in the new moments.

    ``∂Δ/∂m' = -lr/(b1·D)``; ``∂Δ/∂v' = lr·m̂'/(2·b2·sqrt(v_used/b2)·D²)`` (0 where ``v_used = 0``,
    and with amsgrad where the old maximum is used). Args as :func:`update`; both shaped like g.
    """
    st = _step(g, theta, group, state_before)
    h = st.h
    bc1, bc2 = _bias_corrections(h, st.t)
    sqrt_v_hat = (st.v_used / bc2).sqrt()
    d = sqrt_v_hat + h.eps
    d_m = (-h.lr / bc1) / d
    denom = 2.0 * sqrt_v_hat * d**2 * bc2
    d_v = torch.where(denom > 0, (h.lr / bc1) * st.m_new / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                      torch.zeros_like(denom))
    if h.amsgrad:
        d_v = torch.where(st.v_new >= st.v_used, d_v, 0.0)
    return d_m, d_v


def state_after_step(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> dict:
    """The state torch holds after the step (``step``, ``exp_avg``, ``exp_avg_sq``, and with
    amsgrad ``max_exp_avg_sq``): what a replay carries to the next step. Args as :func:`update`."""
    st = _step(g, theta, group, state_before)
    out = {STEP: st.t, EXP_AVG: st.m_new, EXP_AVG_SQ: st.v_new}
    if st.h.amsgrad:
        out[MAX_EXP_AVG_SQ] = st.v_used
    return out


def state_before_step(
    state_after: dict, g: Tensor, theta: Tensor | None, group: dict, before: dict | None = None
) -> dict:
    """The state before the step, reconstructed from the state after it and the gradient used.

    ``m = (m' - (1-β1)·g')/β1``, ``v = max(0, (v' - (1-β2)·g'²)/β2)`` (the subtraction cancels when
    this step's term dominates ``v'``; the error stays within a few roundings of ``v'``'s terms,
    and the clamp keeps it non-negative), ``step - 1``; all zeros after the first step.

    Amsgrad: where the max after the step is above ``v'``, it is the old max, exactly. Where it
    equals ``v'``, the old max is only known to lie in ``[v, v']``: this returns ``v`` (the lower
    bound). :func:`update` and its Jacobian at the recorded gradient come out right either way;
    at another gradient whose ``v'`` falls below the true old max they do not, so read the state
    before the step where that matters (the tracker's midpoint pass does: it runs before the
    update).

    Args:
        state_after: ``optimizer.state[p]`` after the step (torch's keys).
        g, theta, group: as :func:`update` (``g`` the gradient this step used).
        before: unused (the SGD family needs it; same signature).

    Returns:
        A new dict with torch's keys; ``step`` has the type of ``state_after["step"]``.
    """
    h = hyper(group)
    step_after = state_after[STEP]
    g_eff = effective_gradient(g, theta, h)
    m_after = state_after[EXP_AVG].to(g_eff.dtype)
    v_after = state_after[EXP_AVG_SQ].to(g_eff.dtype)
    out: dict = {STEP: step_after - 1}
    if as_float(step_after) <= 1.0:
        out[EXP_AVG], out[EXP_AVG_SQ] = torch.zeros_like(m_after), torch.zeros_like(v_after)
        if h.amsgrad:
            out[MAX_EXP_AVG_SQ] = torch.zeros_like(v_after)
        return out
    out[EXP_AVG] = (m_after - (1.0 - h.beta1) * g_eff) / h.beta1
    v = ((v_after - (1.0 - h.beta2) * g_eff * g_eff) / h.beta2).clamp_min(0.0)
    out[EXP_AVG_SQ] = v
    if h.amsgrad:
        v_max_after = state_after[MAX_EXP_AVG_SQ].to(g_eff.dtype)
        out[MAX_EXP_AVG_SQ] = torch.where(v_max_after > v_after, v_max_after, torch.minimum(v, v_after))
    return out


def preconditioner(group: dict, state: dict, eps: float | None = None) -> Tensor:
    """Adam's fixed-state preconditioner ``P = 1/(sqrt(v_used/(1-β2^t)) + eps)`` from the state after
    a step (``v_used`` = ``max_exp_avg_sq`` with amsgrad, else ``exp_avg_sq``), detached, in the
    state's dtype; ``eps`` overrides the group's. Units 1/gradient."""
    h = hyper(group)
    v_used = state[MAX_EXP_AVG_SQ] if h.amsgrad else state[EXP_AVG_SQ]
    bc2 = 1.0 - h.beta2 ** as_float(state[STEP])
    return ((v_used.detach() / bc2).sqrt_() + (h.eps if eps is None else eps)).reciprocal_()


from inrun_shapley.optim.adam_midpoint import midpoint_many, midpoint_step  # noqa: E402  (uses the above)


@register_adapter(torch.optim.Adam, torch.optim.AdamW)
class AdamAdapter:
    name = "adam"
    update = staticmethod(update)
    update_jacobian_diag = staticmethod(update_jacobian_diag)
    state_before_step = staticmethod(state_before_step)
    state_after_step = staticmethod(state_after_step)
    midpoint_step = staticmethod(midpoint_step)
    midpoint_many = staticmethod(midpoint_many)

    def check_group(self, group: dict) -> str | None:
        if group.get("differentiable"):
            return "differentiable=True is not supported (the step is not recorded in its state)"
        return None

    def before_step(self, group: dict, state: dict) -> dict:
        return {}

    def terms(self, grad, group, state, before, theta, need_drift, need_loo) -> StepTerms:
        h = hyper(group)
        t = as_float(state[STEP])
        bc1, bc2 = _bias_corrections(h, t)
        v_used = state[MAX_EXP_AVG_SQ] if h.amsgrad else state[EXP_AVG_SQ]
        # Same operations as 1/(sqrt(v/bc2) + eps), in place after the first: one new
        # parameter-sized buffer instead of four (fresh buffers cost page faults on CPU).
        sqrt_v_hat = (v_used.to(grad.dtype) / bc2).sqrt_()
        precond = (sqrt_v_hat + h.eps if need_loo else sqrt_v_hat.add_(h.eps)).reciprocal_()
        coeff = (1.0 - h.beta1) / bc1
        terms = StepTerms(lr=h.lr, coeff=coeff, sign=h.sign, precond=precond)
        wd = h.weight_decay

        if need_drift or need_loo:
            g_eff = effective_gradient(grad, theta, h)
        if need_drift:
            m_t = state[EXP_AVG].to(grad.dtype)
            # m_{t-1} recovered from m_t and the gradient actually used at this step.
            beta_m_prev = m_t - (1.0 - h.beta1) * g_eff
            const = beta_m_prev + ((1.0 - h.beta1) * wd * theta if h.l2 != 0 else 0.0)
            drift = -h.lr * precond * const / bc1
            if wd != 0 and h.decoupled:
                drift = drift - h.lr * wd * theta
            terms.drift = drift
        if need_loo:
            after = _Step(h, t, g_eff, state[EXP_AVG].to(grad.dtype), state[EXP_AVG_SQ], v_used)
            terms.loo_precond = coeff * precond - _loo_correction(after, sqrt_v_hat, bc1, bc2)
        return terms
