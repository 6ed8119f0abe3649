"""Adapter for ``torch.optim.Adam`` and ``AdamW`` (amsgrad, maximize, L2 or decoupled weight
decay; foreach/fused/capturable implementations share the same state).

torch's step at count t, with ``s = -1`` under maximize else 1 and L2 decay λ (Adam):

    g' = s·g + λ·θ_t                     (AdamW: θ_t ← (1 - lr·λ)·θ_t instead)
    m_t = β1·m_{t-1} + (1-β1)·g'          v_t = β2·v_{t-1} + (1-β2)·g'²   (amsgrad: running max)
    θ_{t+1} = θ_t - lr·(m_t/(1-β1^t)) / (sqrt(v_t/(1-β2^t)) + eps)

Freezing v_t (the denominator actually used) makes the step affine in g:
``P = 1/(sqrt(v_t/(1-β2^t)) + eps)``, ``k = (1-β1)/(1-β1^t)``, and
``d0 = -lr·P ⊙ (β1·m_{t-1} + (1-β1)·λθ_t)/(1-β1^t)`` (Adam) or
``-lr·P ⊙ β1·m_{t-1}/(1-β1^t) - lr·λ·θ_t`` (AdamW).
Leave-one-out Jacobian (v_t's dependence on g kept, DESIGN.md §2):
``J = k·P - m̂ ⊙ ((1-β2)·g'/(1-β2^t)) / (sqrt(v̂)·(sqrt(v̂)+eps)²)``.
"""

from __future__ import annotations

import torch

from inrun_shapley.optim.base import StepTerms, as_float, register_adapter


@register_adapter(torch.optim.Adam, torch.optim.AdamW)
class AdamAdapter:
    name = "adam"

    def check_group(self, group: dict) -> str | None:
        if group.get("differentiable"):
            return "differentiable=True is not supported (the step is not recorded in its state)"
        return None

    def before_step(self, group: dict, state: dict) -> dict:
        return {}

    def terms(self, grad, group, state, before, theta, need_drift, need_loo) -> StepTerms:
        beta1, beta2 = group["betas"]
        beta1, beta2 = as_float(beta1), as_float(beta2)
        eps, lr, wd = as_float(group["eps"]), as_float(group["lr"]), as_float(group["weight_decay"])
        sign = -1.0 if group.get("maximize") else 1.0
        decoupled = bool(group.get("decoupled_weight_decay", False))
        t = as_float(state["step"])
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        v_used = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        # Same operations as 1/(sqrt(v/bc2) + eps), in place after the first: one new
        # parameter-sized buffer instead of four (fresh buffers cost page faults on CPU).
        sqrt_v_hat = (v_used.to(grad.dtype) / bc2).sqrt_()
        precond = (sqrt_v_hat + eps if need_loo else sqrt_v_hat.add_(eps)).reciprocal_()
        coeff = (1.0 - beta1) / bc1
        terms = StepTerms(lr=lr, coeff=coeff, sign=sign, precond=precond)

        if need_drift or need_loo:
            g_eff = sign * grad
            if wd != 0 and not decoupled:
                if theta is None:
                    raise ValueError("theta is needed for Adam's L2 weight decay term")
                g_eff = g_eff + wd * theta
        if need_drift:
            m_t = state["exp_avg"].to(grad.dtype)
            # m_{t-1} recovered from m_t and the gradient actually used at this step.
            beta_m_prev = m_t - (1.0 - beta1) * g_eff
            const = beta_m_prev + ((1.0 - beta1) * wd * theta if (wd != 0 and not decoupled) else 0.0)
            drift = -lr * precond * const / bc1
            if wd != 0 and decoupled:
                drift = drift - lr * wd * theta
            terms.drift = drift
        if need_loo:
            m_hat = state["exp_avg"].to(grad.dtype) / bc1
            dv = (1.0 - beta2) * g_eff / bc2
            denom = sqrt_v_hat * (sqrt_v_hat + eps) ** 2
            correction = torch.where(denom > 0, m_hat * dv / denom.clamp_min(1e-38), torch.zeros_like(denom))
            if group.get("amsgrad"):  # v only moves with g where the current moment is the max
                correction = torch.where(state["exp_avg_sq"] >= state["max_exp_avg_sq"], correction, 0.0)
            terms.loo_precond = coeff * precond - correction
        return terms
