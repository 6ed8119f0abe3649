"""One step of the adjoint recursion: the step's elementwise derivatives (from the optimizer's
pure functions in :mod:`inrun_shapley.optim`) and the reverse step (package docstring)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.optim import adam, sgd
from inrun_shapley.posthoc.adjoint.work import Work
from inrun_shapley.trajectory import HYPER_FIELDS, Recording, StepState
from inrun_shapley.trajectory.format import group_from_row

JACOBIANS = ("loo", "fixed_state", "full")
GRAD_TOL = 1e-3  # relative gradient-norm mismatch above which the recorded batch is "not what was trained on"
_H = {name: i for i, name in enumerate(HYPER_FIELDS)}


def per_tensor(values, numels_t: Tensor, dtype) -> Tensor:
    """A flat ``[P]`` tensor repeating one value per parameter tensor over its elements."""
    return torch.repeat_interleave(torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype), numels_t)


class Stepper:
    """The per-step elementwise quantities and the reverse step, for one recording."""

    def __init__(self, rec: Recording, work: Work, jacobian: str, dtype):
        self.rec, self.work, self.jacobian, self.dtype = rec, work, jacobian, dtype
        self.numels_t = torch.as_tensor(rec.numels)
        self.family = rec.optimizer
        self.warned_scale = False

    def col(self, st: StepState, field: str) -> Tensor:
        """A hyperparameter column of :data:`HYPER_FIELDS`, per element ``[P]``."""
        return per_tensor(st.hyper[self.rec.groups, _H[field]], self.numels_t, self.dtype)

    def group(self, st: StepState, j: int) -> dict:
        """The torch-style param group of tensor ``j`` at step ``st``."""
        return group_from_row(self.family, st.hyper[self.rec.groups[j]])

    def adam_terms(self, st: StepState, mode: str) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(E_m, E_v or None, g'_s)`` for an Adam step, flat ``[P]``.

        ``E_m = -η·D_s`` (package docstring): ``∂Δ/∂g' / (1-β1)`` for ``"loo"``, ``∂Δ/∂m'`` for
        ``"fixed_state"``/``"full"``; ``E_v = ∂Δ/∂v'`` for ``"full"`` only. The pre-step state
        is reconstructed from the recorded post-step state and gradient.
        """
        rec, dt = self.rec, self.dtype
        if st.exp_avg is None or st.exp_avg_sq is None or st.grad is None:
            raise ConfigurationError(
                f"step {st.step}: Adam's optimizer state (exp_avg, exp_avg_sq, gradient) was not recorded; "
                "record with TrajectoryRecorder(..., optimizer_state=True)"
            )
        n = len(rec.numels)
        vmaxes = st.max_exp_avg_sq.split(rec.numels) if st.max_exp_avg_sq is not None else [None] * n
        chunks = zip(st.theta.split(rec.numels), st.grad.split(rec.numels), st.exp_avg.split(rec.numels),
                     st.exp_avg_sq.split(rec.numels), vmaxes)
        e_m, e_v, g_eff = [], [], []
        for j, (th, g, m, v, vmax) in enumerate(chunks):
            group = self.group(st, j)
            h = adam.hyper(group)
            th, g = th.to(dt), g.to(dt)
            after = {adam.STEP: float(st.opt_step[j]), adam.EXP_AVG: m.to(dt), adam.EXP_AVG_SQ: v.to(dt)}
            if h.amsgrad:
                if vmax is None:
                    raise ConfigurationError(f"step {st.step}: amsgrad's max_exp_avg_sq was not recorded")
                if mode == "full":
                    raise ConfigurationError("jacobian='full' does not support amsgrad; use 'loo' or 'fixed_state'")
                after[adam.MAX_EXP_AVG_SQ] = vmax.to(dt)
            before = adam.state_before_step(after, g, th, group)
            if mode == "loo":
                e_m.append(h.sign * adam.update_jacobian_diag(g, th, group, before) / (1.0 - h.beta1))
            else:
                d_m, d_v = adam.update_moment_partials(g, th, group, before)
                e_m.append(d_m)
                if mode == "full":
                    e_v.append(d_v)
            g_eff.append(adam.effective_gradient(g, th, h))
        return torch.cat(e_m), (torch.cat(e_v) if e_v else None), torch.cat(g_eff)

    def sgd_step_gain(self, st: StepState) -> Tensor:
        """``lr·k`` of an SGD step (``dΔ/dg = -sign·lr·k``, a constant per tensor), flat ``[P]``."""
        gains = []
        for j in range(len(self.rec.numels)):
            h = sgd.hyper(self.group(st, j))
            gains.append(h.lr * h.coeff(bool(st.had_buffer[j])))
        return per_tensor(gains, self.numels_t, self.dtype)

    def sgd_coeffs(self, st: StepState):
        mu, damp, nest = self.col(st, "momentum"), self.col(st, "dampening"), self.col(st, "nesterov")
        had = per_tensor(st.had_buffer, self.numels_t, self.dtype)
        return mu, damp, nest, had

    def stability_matrix_diag(self, st: StepState) -> tuple[Tensor, float]:
        """``(η·D', β)`` of the heavy-ball form of step s (damping rule): ``η·D' = -∂Δ/∂g'``."""
        if self.family == "adam":
            e_m, _, _ = self.adam_terms(st, "loo" if self.jacobian == "full" else self.jacobian)
            b1 = self.col(st, "beta1")
            return -e_m * (1.0 - b1), float(b1.max())
        return self.sgd_step_gain(st), float(self.col(st, "momentum").max())

    def reverse(self, st: StepState, rows, lam: Tensor, carry: dict, rho: float):
        """One reverse step: returns ``(λθ_s, carry for step s-1, values [Q, B])``."""
        lr = self.col(st, "lr")
        wd = self.col(st, "weight_decay")
        sign = 1.0 - 2.0 * self.col(st, "maximize")
        if self.family == "adam":
            dec = self.col(st, "decoupled")
            b1, b2 = self.col(st, "beta1"), self.col(st, "beta2")
            e_m, e_v, gp = self.adam_terms(st, self.jacobian)
            lam_m = e_m * lam + carry.get("m", 0.0)
            a = (1.0 - b1) * lam_m
            new_carry = {"m": b1 * lam_m}
            if e_v is not None:
                lam_v = e_v * lam + carry.get("v", 0.0)
                a = a + 2.0 * (1.0 - b2) * gp * lam_v
                new_carry["v"] = b2 * lam_v
            decay, l2 = 1.0 - lr * wd * dec, wd * (1.0 - dec)
        else:
            mu, damp, nest, had = self.sgd_coeffs(st)
            if bool((mu != 0).any()):
                lam_b = -lr * torch.where(nest > 0, mu, torch.ones_like(mu)) * lam + carry.get("b", 0.0)
                a_mom = -lr * nest * lam + torch.where(had > 0, 1.0 - damp, torch.ones_like(damp)) * lam_b
                a = torch.where(mu != 0, a_mom, -lr * lam)
                new_carry = {"b": torch.where((had > 0) & (mu != 0), mu * lam_b, torch.zeros_like(lam_b))}
            else:
                a, new_carry = -lr * lam, {}
            decay, l2 = 1.0, wd
        g, ha, dots = self.work.terms(st.theta.to(self.dtype), rows, sign * a)
        norm = float(g.double().norm())
        if norm > 0 and abs(norm - st.grad_norm) > GRAD_TOL * norm:
            # the optimizer used a rescaled gradient (clipping, loss scaling): c_i and H scale with it
            kappa = st.grad_norm / norm
            if not self.warned_scale:
                warnings.warn(
                    f"step {st.step}: the recorded gradient norm ({st.grad_norm:.4g}) differs from loss_fn's on the "
                    f"recorded batch ({norm:.4g}); contributions are scaled by the ratio (gradient clipping) — check "
                    "loss_fn and reduction if the run was not clipped", stacklevel=3)
                self.warned_scale = True
            ha, dots = kappa * ha, kappa * dots
        lam_prev = decay * lam + rho * ha + l2 * a
        return lam_prev, new_carry, dots
