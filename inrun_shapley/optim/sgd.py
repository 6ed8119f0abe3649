"""Adapter for ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize).

torch's step with ``s = -1`` under maximize else 1, L2 decay λ, momentum μ, dampening d:

    g' = s·g + λ·θ_t
    buf_t = g'                     (first step with momentum: no buffer yet)
    buf_t = μ·buf_{t-1} + (1-d)·g' (afterwards)
    update = g' + μ·buf_t (Nesterov) or buf_t (momentum) or g' (μ = 0);  θ_{t+1} = θ_t - lr·update

The update is affine in g: ``coeff`` k = 1, (1-d), 1+μ(1-d) (or 1+μ on the first Nesterov step),
and the drift ``d0 = -lr·(μ·buf_{t-1} [μ²·buf_{t-1} for Nesterov] + k·λ·θ_t)``.
"""

from __future__ import annotations

import torch

from inrun_shapley.optim.base import StepTerms, as_float, register_adapter


@register_adapter(torch.optim.SGD)
class SGDAdapter:
    name = "sgd"

    def check_group(self, group: dict) -> str | None:
        if group.get("differentiable"):
            return "differentiable=True is not supported"
        return None

    def before_step(self, group: dict, state: dict) -> dict:
        return {"had_buffer": state.get("momentum_buffer") is not None}

    def terms(self, grad, group, state, before, theta, need_drift, need_loo) -> StepTerms:
        lr, wd = as_float(group["lr"]), as_float(group["weight_decay"])
        mu, damp = as_float(group["momentum"]), as_float(group["dampening"])
        nesterov = bool(group["nesterov"])
        sign = -1.0 if group.get("maximize") else 1.0
        had_buffer = before.get("had_buffer", False)
        if mu == 0:
            coeff = 1.0
        elif not had_buffer:
            coeff = 1.0 + mu if nesterov else 1.0
        else:
            coeff = 1.0 + mu * (1.0 - damp) if nesterov else 1.0 - damp
        terms = StepTerms(lr=lr, coeff=coeff, sign=sign)
        if need_drift:
            const = coeff * wd * theta if wd != 0 else torch.zeros_like(grad)
            if mu != 0 and had_buffer:
                g_eff = sign * grad + (wd * theta if wd != 0 else 0.0)
                buf_prev = (state["momentum_buffer"].to(grad.dtype) - (1.0 - damp) * g_eff) / mu
                const = const + (mu * mu if nesterov else mu) * buf_prev
            terms.drift = -lr * const
        return terms
