"""``torch.optim.SGD``: the step as pure functions, and the adapter the tracker uses.

Momentum, dampening, Nesterov, weight decay, maximize. torch's step with ``s = -1`` under
maximize else 1, L2 decay λ, momentum μ, dampening d::

    g' = s·g + λ·θ_t
    buf_t = g'                     (first step with momentum: no buffer yet)
    buf_t = μ·buf_{t-1} + (1-d)·g' (afterwards)
    Δ = θ_{t+1} - θ_t = -lr·(g' + μ·buf_t (Nesterov) or buf_t (momentum) or g' (μ = 0))

The update is affine in g: ``dΔ/dg = -s·lr·k`` with ``k`` = 1, (1-d), 1+μ(1-d) (or 1+μ on the
first Nesterov step); the tracker's drift is ``d0 = -lr·(μ·buf_{t-1} [μ²·buf_{t-1} for Nesterov]
+ k·λ·θ_t)``.

The state name is torch's (``momentum_buffer``, kept only with momentum). Whether a buffer
existed before the step cannot be told from the state after it: the adapter's ``before_step``
records it in the step pre-hook (``{"had_buffer": bool}``), and :func:`state_before_step` takes it.
Hyperparameters are read from the param group by :func:`hyper` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.optim.base import StepTerms, as_float, register_adapter

MOMENTUM_BUFFER = "momentum_buffer"
STATE_KEYS = (MOMENTUM_BUFFER,)
"""torch's per-parameter tensors of SGD's state."""


@dataclass(frozen=True)
class SGDHyper:
    """An SGD param group's hyperparameters as plain floats and flags."""

    lr: float
    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool

    @property
    def sign(self) -> float:
        """-1 under ``maximize`` (torch negates the gradient), else 1."""
        return -1.0 if self.maximize else 1.0

    def coeff(self, had_buffer: bool) -> float:
        """``k``: the factor of ``g'`` in the update (module docstring)."""
        mu, damp = self.momentum, self.dampening
        if mu == 0:
            return 1.0
        if not had_buffer:
            return 1.0 + mu if self.nesterov else 1.0
        return 1.0 + mu * (1.0 - damp) if self.nesterov else 1.0 - damp


def hyper(group: dict) -> SGDHyper:
    """Read an SGD param group (``lr`` and ``weight_decay`` may be 0-d tensors)."""
    return SGDHyper(
        lr=as_float(group["lr"]), weight_decay=as_float(group["weight_decay"]),
        momentum=as_float(group["momentum"]), dampening=as_float(group["dampening"]),
        nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)),
    )


def effective_gradient(g: Tensor, theta: Tensor | None, h: SGDHyper) -> Tensor:
    """``g' = s·g + λ·θ``."""
    g_eff = -g if h.maximize else g
    if h.weight_decay != 0:
        if theta is None:
            raise ValueError("theta is needed for SGD's weight decay term")
        g_eff = g_eff + h.weight_decay * theta
    return g_eff


def _buffer(state: dict) -> Tensor | None:
    return state.get(MOMENTUM_BUFFER) if state else None


def update(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> Tensor:
    """The parameter change ``Δ = θ_{t+1} - θ_t`` torch's SGD step makes from gradient ``g``.

    Args:
        g: the gradient the optimizer uses (after unscaling and clipping), shaped like the
            parameter.
        theta: the parameter before the step (may be None without weight decay).
        group: the parameter's param group (torch's keys).
        state_before: the state before the step: ``{"momentum_buffer": buf_{t-1}}``, or ``{}`` /
            a None buffer before the first momentum step.

    Returns:
        ``Δ`` shaped like ``g``; affine and elementwise in ``g``.
    """
    h = hyper(group)
    g_eff = effective_gradient(g, theta, h)
    if h.momentum == 0:
        return -h.lr * g_eff
    buf = _new_buffer(g_eff, h, state_before)
    step = g_eff + h.momentum * buf if h.nesterov else buf
    return -h.lr * step


def _new_buffer(g_eff: Tensor, h: SGDHyper, state_before: dict) -> Tensor:
    buf = _buffer(state_before)
    return g_eff if buf is None else buf.to(g_eff.dtype) * h.momentum + (1.0 - h.dampening) * g_eff


def state_after_step(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> dict:
    """The state torch holds after the step (``{"momentum_buffer": buf_t}``, ``{}`` without
    momentum): what a replay carries to the next step. Args as :func:`update`."""
    h = hyper(group)
    if h.momentum == 0:
        return {}
    return {MOMENTUM_BUFFER: _new_buffer(effective_gradient(g, theta, h), h, state_before)}


def update_jacobian_diag(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> Tensor:
    """``dΔ/dg = -s·lr·k`` (a constant: the update is affine), as a tensor shaped like ``g``."""
    h = hyper(group)
    return torch.full_like(g, -h.sign * h.lr * h.coeff(_buffer(state_before) is not None))


def state_before_step(
    state_after: dict, g: Tensor, theta: Tensor | None, group: dict, before: dict | None = None
) -> dict:
    """The state before the step from the state after it: ``buf_{t-1} = (buf_t - (1-d)·g')/μ``.

    Args:
        state_after: ``optimizer.state[p]`` after the step.
        g, theta, group: as :func:`update`.
        before: what ``SGDAdapter.before_step`` returned in the step pre-hook (``had_buffer``);
            required with momentum (the first step's buffer cannot be told apart otherwise).

    Returns:
        ``{"momentum_buffer": buf_{t-1} or None}`` (``{}`` without momentum).

    Raises:
        ConfigurationError: momentum and no ``before``.
    """
    h = hyper(group)
    if h.momentum == 0:
        return {}
    if before is None or "had_buffer" not in before:
        raise ConfigurationError(
            "SGD with momentum: pass before=SGDAdapter().before_step(group, state) taken in the step pre-hook "
            "(whether a momentum buffer existed before the step)"
        )
    if not before["had_buffer"]:
        return {MOMENTUM_BUFFER: None}
    g_eff = effective_gradient(g, theta, h)
    buf = state_after[MOMENTUM_BUFFER].to(g_eff.dtype)
    return {MOMENTUM_BUFFER: (buf - (1.0 - h.dampening) * g_eff) / h.momentum}


def midpoint_step(g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> tuple[Tensor, Tensor]:
    """``(Δ(g/2), dΔ/dg)`` of one parameter from its state before the step (:func:`midpoint_many`
    on one parameter)."""
    deltas, jacs = midpoint_many([g], [theta], group, [state_before])
    return deltas[0], jacs[0]


def midpoint_many(grads: list[Tensor], thetas: list[Tensor | None], group: dict, states_before: list[dict],
                  steps: list[float | None] | None = None, plus_theta: bool = False,
                  workspace=None) -> tuple[list[Tensor], list[Tensor]]:
    """``(Δ(g/2), dΔ/dg)`` of every parameter of one param group, list-wide (``torch._foreach_*``),
    from the optimizer state BEFORE the step that uses gradients ``grads`` (``dΔ/dg`` is the
    constant ``-s·lr·k``: the update is affine). ``steps`` and ``workspace`` unused (the same
    signature as Adam's); ``plus_theta``: return ``θ + Δ(g/2)`` instead of ``Δ(g/2)``. Nothing in
    the states is written; no host read."""
    h = hyper(group)
    n = len(grads)
    fe = torch
    g_h = fe._foreach_mul(grads, -0.5 if h.maximize else 0.5)  # g' at g/2
    if h.weight_decay != 0:
        if any(t is None for t in thetas):
            raise ValueError("theta is needed for SGD's weight decay term")
        fe._foreach_add_(g_h, thetas, alpha=h.weight_decay)
    had = [h.momentum != 0 and _buffer(st) is not None for st in states_before]
    steps_out = list(g_h)
    idx = [i for i in range(n) if had[i]]
    if idx:  # buf = μ·buf_{t-1} + (1-d)·g'_h
        new_buf = fe._foreach_mul([states_before[i][MOMENTUM_BUFFER].to(grads[i].dtype) for i in idx], h.momentum)
        fe._foreach_add_(new_buf, [g_h[i] for i in idx], alpha=1.0 - h.dampening)
        for k, i in enumerate(idx):
            steps_out[i] = new_buf[k]
    if h.momentum != 0 and h.nesterov:
        steps_out = fe._foreach_add(g_h, steps_out, alpha=h.momentum)
    if plus_theta:
        deltas = [t.clone() for t in thetas]
        fe._foreach_add_(deltas, steps_out, alpha=-h.lr)
    else:
        deltas = fe._foreach_mul(steps_out, -h.lr)
    jacs = [torch.full_like(grads[i], -h.sign * h.lr * h.coeff(had[i])) for i in range(n)]
    return deltas, jacs


@register_adapter(torch.optim.SGD)
class SGDAdapter:
    name = "sgd"
    update = staticmethod(update)
    update_jacobian_diag = staticmethod(update_jacobian_diag)
    state_before_step = staticmethod(state_before_step)
    state_after_step = staticmethod(state_after_step)
    midpoint_step = staticmethod(midpoint_step)
    midpoint_many = staticmethod(midpoint_many)

    def check_group(self, group: dict) -> str | None:
        if group.get("differentiable"):
            return "differentiable=True is not supported"
        return None

    def before_step(self, group: dict, state: dict) -> dict:
        return {"had_buffer": _buffer(state) is not None}

    def terms(self, grad, group, state, before, theta, need_drift, need_loo) -> StepTerms:
        h = hyper(group)
        had_buffer = before.get("had_buffer", False)
        coeff = h.coeff(had_buffer)
        terms = StepTerms(lr=h.lr, coeff=coeff, sign=h.sign)
        if need_drift:
            wd, mu = h.weight_decay, h.momentum
            const = coeff * wd * theta if wd != 0 else torch.zeros_like(grad)
            if mu != 0 and had_buffer:
                g_eff = effective_gradient(grad, theta, h)
                buf_prev = (state[MOMENTUM_BUFFER].to(grad.dtype) - (1.0 - h.dampening) * g_eff) / mu
                const = const + (mu * mu if h.nesterov else mu) * buf_prev
            terms.drift = -h.lr * const
        return terms
