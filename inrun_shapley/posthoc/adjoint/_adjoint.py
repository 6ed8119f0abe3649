"""Trajectory-aware influence: the adjoint pass over a recorded run (DESIGN.md §2b).

The whole run is linearized around the recorded trajectory and propagated backwards from the
final model, one adjoint vector per query, all queries at once (``[Q, P]`` flat tensors).

Notation for step ``s`` (1-based, parameters ``θ_s`` before it, batch gradient ``g_s = Σ_i c_i``
with ``c_i`` sample i's contribution, scaled like the loss reduction: ``∇ℓ_i/|B|`` for a mean),
``σ = -1`` under ``maximize`` else 1, L2 decay ``λ2`` (Adam's coupled decay, SGD's decay),
decoupled decay ``λd`` (AdamW), ``g'_s = σ·g_s + λ2·θ_s`` the gradient the update consumes,
``H_s`` = Hessian of step s's batch loss at ``θ_s``, ``ρ`` the curvature damping (below).
Start: ``λθ_{T+1} = ∇f_q(θ_{T+1})``, every carry 0. Going from s = T down to the first step:

**Adam/AdamW** (``u = m̂/(sqrt(v̂)+eps)`` the update direction, ``θ_{s+1} = (1-η·λd)·θ_s - η·u``)::

    λm_s = -η·D_s ⊙ λθ_{s+1} + β1·λm_{s+1}
    λv_s = -η·(∂u/∂v_s) ⊙ λθ_{s+1} + β2·λv_{s+1}                    (jacobian="full" only)
    a_s  = (1-β1)·λm_s [+ 2(1-β2)·g'_s ⊙ λv_s]                      (= ∂f/∂g'_s)
    λθ_s = (1-η·λd)·λθ_{s+1} + ρ·σ·H_s a_s + λ2·a_s
    value[i, q] += σ·⟨a_s, c_i^s⟩

with ``D_s`` by ``jacobian``:

* ``"loo"`` (default, DESIGN.md §2b): ``D = J_s/(1-β1)``, ``J_s`` the diagonal leave-one-out
  Jacobian of the real step w.r.t. the gradient (``StepTerms.loo_precond`` of the Adam adapter:
  the second moment's dependence on this step's gradient kept). This is the exact adjoint of the
  linear system ``δm_s = β1·δm_{s-1} + (1-β1)·δg'_s``, ``δθ_{s+1} = (1-ηλd)·δθ_s -
  η·J_s/(1-β1) ⊙ δm_s``: J's second-moment correction is applied to every perturbation of
  ``m_s``, and ``v``'s memory of earlier steps is dropped. It is an approximation of the real
  run's derivative, not the derivative of any real optimizer.
* ``"fixed_state"``: ``D = P_s/(1-β1^t)`` (the second moment frozen at its recorded values):
  exactly the derivative of the run with ``v_s`` held at the recorded trajectory.
* ``"full"``: ``D = P_s/(1-β1^t)`` and the second moment propagated as a state too,
  ``∂u/∂v = -m̂/(2·sqrt(v̂)·(sqrt(v̂)+eps)²·(1-β2^t))``: exactly the derivative of the real
  Adam run (no amsgrad).

**SGD** (momentum ``μ``, dampening ``d``, Nesterov; buffer ``b_s``)::

    λb_s = -η·(μ if nesterov else 1)·λθ_{s+1} + μ_{s+1}·λb_{s+1}   (0 without momentum)
    a_s  = -η·[nesterov]·λθ_{s+1} + k_b·λb_s                       (k_b = 1-d; 1 on a first step)
         = -η·λθ_{s+1}                                              (no momentum)
    λθ_s = λθ_{s+1} + ρ·σ·H_s a_s + λ2·a_s,   value[i, q] += σ·⟨a_s, c_i^s⟩

(plain SGD: ``λθ_s = (I - ηH_s)λθ_{s+1}``, ``value += -η⟨λθ_{s+1}, c_i⟩``, as in the design).
With ``ρ = 1`` these are exact derivatives of the final output w.r.t. a weight ``w_i`` on each
sample's loss term, at ``w = 1`` (for SGD: of the real run; for Adam: as listed above).

**Sign and units.** ``value[i, q] > 0``: up-weighting sample i in the steps that contained it
raises ``f_q`` at the end of the run; units of ``f_q`` per unit of sample weight (a first-order
estimate of removing i is ``-value[i, q]``).

**Damping** ``ρ`` scales the curvature term only. ``damping="auto"`` (default) is chosen from the
stability of the recursion, never from attribution quality: linearized, each step of the tangent
system is a heavy-ball iteration with momentum ``β`` (``β1``, or ``μ`` for SGD) on the matrix
``A_s = η_s·D'_s·H_s`` (``D'`` = ``J_s`` for Adam, the gradient coefficient for SGD), stable for
eigenvalues of A in ``[0, 2(1+β)]``. Power iteration (20 Hessian-vector products) estimates the
spectral radius ``a_s`` of ``A_s`` at 8 steps spread over the propagated window; then
``ρ = min(1, (1+β)/max_s a_s)``: the largest eigenvalue is kept at half the stability bound.
``damping=1.0`` switches it off; any float in (0, 1] fixes ρ.

Cost per step: one forward, one double-backward over the batch (batched over the Q directions by
``is_grads_batched``) giving both the Hessian-vector products and every ``⟨c_i, a_q⟩``; memory
``O(Q·P)`` (``2`` to ``3`` ``[Q, P]`` tensors), no per-sample gradient is materialized.

**Gradient clipping.** When the recorded gradient norm differs from the one ``loss_fn`` gives
on the recorded batch by more than 0.1 %, the contributions and the Hessian term are scaled by
the ratio ``κ`` (the clipping factor, held fixed as in DESIGN.md §2) with a warning; replayed
recordings (``every > 1``) refuse such runs.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from inrun_shapley.errors import ConfigurationError, LogError, NonFiniteError
from inrun_shapley.optim.adam import AdamAdapter
from inrun_shapley.trajectory import HYPER_FIELDS, Recording, StepState

JACOBIANS = ("loo", "fixed_state", "full")
_H = {name: i for i, name in enumerate(HYPER_FIELDS)}
_ADAM = AdamAdapter()
GRAD_TOL = 1e-3  # relative gradient-norm mismatch above which the recorded batch is "not what was trained on"


# ------------------------------------------------------------------------------ helpers
def _cast(obj, dtype):
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _rows(train_data, ids: np.ndarray):
    """The batch rows of ``ids``: ``train_data(ids)`` if callable, ``tuple(t[ids])`` for a tuple or
    list of tensors, ``{k: t[ids]}`` for a dict of tensors, else ``train_data[ids]``."""
    idx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if callable(train_data) and not isinstance(train_data, (Tensor, nn.Module)):
        return train_data(idx)
    if isinstance(train_data, (tuple, list)):
        return type(train_data)(t[idx] for t in train_data)
    if isinstance(train_data, dict):
        return {k: v[idx] for k, v in train_data.items()}
    return train_data[idx]


class _Work:
    """A private copy of the model whose parameters are set from flat vectors; the batch terms."""

    def __init__(self, model: nn.Module, rec: Recording, dtype: torch.dtype, loss_fn, reduction, query_block):
        self.model = copy.deepcopy(model).to(dtype)
        named = dict(self.model.named_parameters())
        self.params = [named[n] for n in rec.names]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.numels, self.shapes = rec.numels, rec.shapes
        self.dtype, self.loss_fn, self.reduction, self.query_block = dtype, loss_fn, reduction, query_block

    def load(self, theta: Tensor) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, theta.split(self.numels)):
                p.copy_(t.view_as(p))

    def split(self, a: Tensor) -> list[Tensor]:
        return [x.reshape(a.shape[0], *s) for x, s in zip(a.split(self.numels, dim=1), self.shapes)]

    @staticmethod
    def flat(parts, like: list[Tensor], batch: int | None = None) -> Tensor:
        out = []
        for g, p in zip(parts, like):
            if g is None:
                g = torch.zeros((batch, *p.shape) if batch else p.shape, dtype=p.dtype)
            out.append(g.reshape(batch, -1) if batch else g.reshape(-1))
        return torch.cat(out, dim=1 if batch else 0)

    def terms(self, theta: Tensor, rows, a: Tensor | None = None):
        """Gradient ``Σ_i c_i`` at ``theta``; with directions ``a [Q, P]`` also ``H a [Q, P]`` and
        ``⟨c_i, a_q⟩ [Q, B]`` (H = Hessian of the reduced batch loss)."""
        self.load(theta)
        with torch.enable_grad():
            losses = self.loss_fn(self.model, rows)
            if not isinstance(losses, Tensor) or losses.dim() != 1:
                raise ConfigurationError(
                    f"loss_fn(model, batch) must return per-sample losses [B], got "
                    f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}"
                )
            b = losses.shape[0]
            w = torch.full((b,), 1.0 / b if self.reduction == "mean" else 1.0, dtype=losses.dtype,
                           requires_grad=a is not None)
            grads = torch.autograd.grad((w * losses).sum(), self.params, create_graph=a is not None,
                                        allow_unused=True)
            g = self.flat([None if x is None else x.detach() for x in grads], self.params)
            if a is None:
                return g, None, None
            live = [i for i, x in enumerate(grads) if x is not None and x.requires_grad]
            outs_h, outs_d = [], []
            for blk in a.split(self.query_block or a.shape[0]):
                parts = self.split(blk)
                res = torch.autograd.grad(
                    [grads[i] for i in live], self.params + [w], grad_outputs=[parts[i] for i in live],
                    is_grads_batched=True, retain_graph=True, allow_unused=True,
                )
                outs_h.append(self.flat(res[:-1], self.params, blk.shape[0]))
                d = res[-1] if res[-1] is not None else torch.zeros(blk.shape[0], b, dtype=blk.dtype)
                outs_d.append(d * w.detach())  # ⟨∇ℓ_i, a⟩ · w_i = ⟨c_i, a⟩
        return g, torch.cat(outs_h), torch.cat(outs_d)


def _col(st: StepState, field: str, rec: Recording, numels_t: Tensor, dtype) -> Tensor:
    per_tensor = torch.as_tensor(st.hyper[rec.groups, _H[field]], dtype=dtype)
    return torch.repeat_interleave(per_tensor, numels_t)


def _per_tensor(values, numels_t: Tensor, dtype) -> Tensor:
    return torch.repeat_interleave(torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype), numels_t)


# ------------------------------------------------------------------------------ step math
class _Stepper:
    """The per-step elementwise quantities and the reverse step, for one recording."""

    def __init__(self, rec: Recording, work: _Work, jacobian: str, dtype):
        self.rec, self.work, self.jacobian, self.dtype = rec, work, jacobian, dtype
        self.numels_t = torch.as_tensor(rec.numels)
        self.family = rec.optimizer
        self.warned_scale = False

    def col(self, st, field):
        return _col(st, field, self.rec, self.numels_t, self.dtype)

    def adam_d(self, st: StepState, for_stability: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(D_s, ∂u/∂v_s or None, g'_s)`` for an Adam step (module docstring)."""
        rec, dt = self.rec, self.dtype
        if st.exp_avg is None or st.exp_avg_sq is None or st.grad is None:
            raise ConfigurationError(
                f"step {st.step}: Adam's optimizer state (exp_avg, exp_avg_sq, gradient) was not recorded; "
                "record with TrajectoryRecorder(..., optimizer_state=True)"
            )
        d_parts, dv_parts, gp_parts = [], [], []
        chunks = zip(st.theta.split(rec.numels), st.grad.split(rec.numels), st.exp_avg.split(rec.numels),
                     st.exp_avg_sq.split(rec.numels),
                     st.max_exp_avg_sq.split(rec.numels) if st.max_exp_avg_sq is not None else [None] * len(rec.numels))
        for j, (th, g, m, v, vmax) in enumerate(chunks):
            h = st.hyper[rec.groups[j]]
            group = {
                "lr": h[_H["lr"]], "betas": (h[_H["beta1"]], h[_H["beta2"]]), "eps": h[_H["eps"]],
                "weight_decay": h[_H["weight_decay"]], "maximize": bool(h[_H["maximize"]]),
                "decoupled_weight_decay": bool(h[_H["decoupled"]]), "amsgrad": bool(h[_H["amsgrad"]]),
            }
            state = {"step": float(st.opt_step[j]), "exp_avg": m.to(dt), "exp_avg_sq": v.to(dt)}
            if group["amsgrad"]:
                if vmax is None:
                    raise ConfigurationError(f"step {st.step}: amsgrad's max_exp_avg_sq was not recorded")
                state["max_exp_avg_sq"] = vmax.to(dt)
            mode = "loo" if for_stability and self.jacobian == "full" else self.jacobian
            t = _ADAM.terms(g.to(dt), group, state, {}, th.to(dt), need_drift=False, need_loo=mode == "loo")
            b1, b2 = group["betas"]
            bc1, bc2 = 1.0 - b1 ** state["step"], 1.0 - b2 ** state["step"]
            if mode == "loo":
                d_parts.append(t.loo_precond / (1.0 - b1))
            else:
                d_parts.append(t.precond / bc1)
            gp = t.sign * g.to(dt)
            if group["weight_decay"] and not group["decoupled_weight_decay"]:
                gp = gp + group["weight_decay"] * th.to(dt)
            gp_parts.append(gp)
            if mode == "full":
                if group["amsgrad"]:
                    raise ConfigurationError("jacobian='full' does not support amsgrad; use 'loo' or 'fixed_state'")
                sv = (state["exp_avg_sq"] / bc2).sqrt()
                denom = 2.0 * sv * (sv + group["eps"]) ** 2 * bc2
                mhat = state["exp_avg"] / bc1
                dv_parts.append(torch.where(denom > 0, -mhat / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(denom)))
        return torch.cat(d_parts), (torch.cat(dv_parts) if dv_parts else None), torch.cat(gp_parts)

    def sgd_coeffs(self, st: StepState):
        mu, damp, nest = self.col(st, "momentum"), self.col(st, "dampening"), self.col(st, "nesterov")
        had = _per_tensor(st.had_buffer, self.numels_t, self.dtype)
        return mu, damp, nest, had

    def stability_matrix_diag(self, st: StepState) -> tuple[Tensor, float]:
        """``(η·D', β)`` of the heavy-ball form of step s (damping rule)."""
        lr = self.col(st, "lr")
        if self.family == "adam":
            d, _, _ = self.adam_d(st, for_stability=True)
            b1 = self.col(st, "beta1")
            return lr * d * (1.0 - b1), float(b1.max())
        mu, damp, nest, had = self.sgd_coeffs(st)
        k = torch.where(mu == 0, torch.ones_like(mu),
                        torch.where(nest > 0, 1.0 + mu * (1.0 - damp), 1.0 - damp))
        return lr * k, float(mu.max())

    def reverse(self, st: StepState, rows, lam: Tensor, carry: dict, rho: float):
        """One reverse step: returns ``(λθ_s, carry for step s-1, values [Q, B])``."""
        lr = self.col(st, "lr")
        wd = self.col(st, "weight_decay")
        sign = 1.0 - 2.0 * self.col(st, "maximize")
        if self.family == "adam":
            dec = self.col(st, "decoupled")
            b1, b2 = self.col(st, "beta1"), self.col(st, "beta2")
            d, dv, gp = self.adam_d(st)
            lam_m = -lr * d * lam + carry.get("m", 0.0)
            a = (1.0 - b1) * lam_m
            new_carry = {"m": b1 * lam_m}
            if dv is not None:
                lam_v = -lr * dv * lam + carry.get("v", 0.0)
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


# ------------------------------------------------------------------------------ step sources
def _adam_update(st: StepState, theta, g, m, v, vmax, col):
    lr, b1, b2, eps = col("lr"), col("beta1"), col("beta2"), col("eps")
    wd, dec, amsgrad = col("weight_decay"), col("decoupled"), col("amsgrad")
    gp = torch.where(col("maximize") > 0, -g, g)
    theta = torch.where(dec > 0, theta * (1.0 - lr * wd), theta)
    gp = torch.where(dec > 0, gp, gp + wd * theta)
    m = m.lerp(gp, 1.0 - b1)
    v = v * b2 + (1.0 - b2) * gp * gp
    t = col("__opt_step")
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    vmax = torch.maximum(vmax, v)
    v_used = torch.where(amsgrad > 0, vmax, v)
    denom = v_used.sqrt() / bc2.sqrt() + eps
    return theta - (lr / bc1) * m / denom, m, v, vmax


def _sgd_update(st: StepState, theta, g, buf, had, col):
    lr, wd, mu, damp, nest = col("lr"), col("weight_decay"), col("momentum"), col("dampening"), col("nesterov")
    gp = torch.where(col("maximize") > 0, -g, g) + wd * theta
    buf = torch.where(had > 0, buf * mu + (1.0 - damp) * gp, gp)
    upd = torch.where(mu == 0, gp, torch.where(nest > 0, gp + mu * buf, buf))
    return theta - lr * upd, buf


class _Source:
    """Per-step states, newest first: read (``every=1``) or replayed from checkpoints."""

    def __init__(self, rec: Recording, stepper: _Stepper, train_data, dtype):
        self.rec, self.stepper, self.train_data, self.dtype = rec, stepper, train_data, dtype
        self.max_replay_error = 0.0

    def rows(self, ids):
        return _cast(_rows(self.train_data, ids), self.dtype)

    def segments(self, first: int, last: int) -> list[tuple[int, int]]:
        if self.rec.every == 1:
            return [(s, s) for s in range(first, last + 1)]
        cks = [c for c in self.rec.checkpoint_steps if c <= last]
        segs = []
        for i, c in enumerate(cks):
            end = (cks[i + 1] - 1) if i + 1 < len(cks) else last
            if end >= first:
                segs.append((c, end))
        return segs

    def states(self, seg: tuple[int, int]) -> list[StepState]:
        """States of the steps of ``seg``, oldest first, tensors filled."""
        if self.rec.every == 1:
            st = self.rec.state(seg[0])
            if st.theta is None:
                raise LogError(f"step {seg[0]}: θ was not recorded")
            return [st]
        return list(self._replay(*seg))

    def _replay(self, start: int, end: int) -> Iterator[StepState]:
        rec, dt, st_ = self.rec, self.dtype, self.stepper
        ck = rec.checkpoint(start)
        theta = ck["theta"].to(dt)
        fresh = bool(np.all(np.asarray(ck["opt_step"]) == 0)) and not bool(np.any(ck["had_buffer"]))
        zeros = torch.zeros_like(theta)

        def state(key):
            if key in ck:
                return ck[key].to(dt)
            if fresh or key == "max_exp_avg_sq":
                return zeros.clone()
            raise ConfigurationError(
                f"checkpoint before step {start}: the optimizer state ({key}) was not recorded; record with "
                "TrajectoryRecorder(..., optimizer_state=True)"
            )

        if rec.optimizer == "adam":
            m, v, vmax = state("exp_avg"), state("exp_avg_sq"), state("max_exp_avg_sq")
        elif "momentum_buffer" in ck:
            buf = ck["momentum_buffer"].to(dt)
        elif bool(np.any(ck["had_buffer"])):
            raise ConfigurationError(
                f"checkpoint before step {start}: the momentum buffer was not recorded; record with "
                "TrajectoryRecorder(..., optimizer_state=True)"
            )
        else:
            buf = zeros.clone()
        for s in range(start, end + 1):
            st = rec.state(s)
            g, _, _ = st_.work.terms(theta, self.rows(st.ids))
            norm = float(g.double().norm())
            if abs(norm - st.grad_norm) > GRAD_TOL * max(st.grad_norm, 1e-12):
                raise ConfigurationError(
                    f"replay of step {s} diverged: the recorded gradient norm is {st.grad_norm:.6g} but loss_fn on "
                    f"the recorded batch gives {norm:.6g} (gradient clipping, loss scaling, dropout, or a different "
                    "loss_fn/reduction than in training?). Record with every=1 for such runs."
                )
            st.theta, st.grad = theta, g

            def col(field, st=st):
                if field == "__opt_step":
                    return _per_tensor(st.opt_step, st_.numels_t, dt)
                return st_.col(st, field)

            if rec.optimizer == "adam":
                nxt, m, v, vmax = _adam_update(st, theta, g, m, v, vmax, col)
                st.exp_avg, st.exp_avg_sq = m, v
                st.max_exp_avg_sq = vmax if bool(st.hyper[:, _H["amsgrad"]].any()) else None
            else:
                had = _per_tensor(st.had_buffer, st_.numels_t, dt)
                nxt, buf = _sgd_update(st, theta, g, buf, had, col)
            yield st
            theta = nxt
        if end == rec.last_step:
            ref = rec.final_theta().to(dt)
            self.max_replay_error = max(self.max_replay_error,
                                        float((theta - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))


# ------------------------------------------------------------------------------ the pass
def _check_model(model: nn.Module, rec: Recording) -> None:
    have = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = dict(zip(rec.names, rec.shapes))
    missing = [n for n in want if n not in have]
    wrong = [f"{n}: recorded {want[n]}, model {have[n]}" for n in want if n in have and have[n] != want[n]]
    if missing or wrong:
        raise ConfigurationError(
            "the model does not match the recording (queries for a different model?):"
            + (f" parameters missing from the model: {missing};" if missing else "")
            + (f" shapes differ: {wrong};" if wrong else "")
            + " pass the architecture that was trained when the recording was made"
        )


def _query_gradients(work: _Work, theta: Tensor, output_fn, queries, block) -> Tensor:
    work.load(theta)
    with torch.enable_grad():
        out = output_fn(work.model, queries)
        if not isinstance(out, Tensor) or out.dim() != 1:
            raise ConfigurationError(
                f"output_fn(model, queries) must return one value per query [Q], got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        q = out.shape[0]
        eye = torch.eye(q, dtype=out.dtype)
        parts = []
        for blk in eye.split(block or q):
            res = torch.autograd.grad(out, work.params, grad_outputs=blk, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
            parts.append(_Work.flat(res, work.params, blk.shape[0]))
    return torch.cat(parts)


def stability_damping(stepper: _Stepper, source: _Source, steps: list[int], iters: int = 20,
                      seed: int = 0) -> tuple[float, list[float]]:
    """The default damping (module docstring): ``ρ = min(1, (1+β)/max_s a_s)`` from power iteration
    on ``A_s = η_s·D'_s·H_s`` at ``steps``. Returns ``(ρ, [a_s])``."""
    gen = torch.Generator().manual_seed(seed)
    radii, beta = [], 0.0
    wanted = set(steps)
    for seg in source.segments(min(steps), max(steps)):
        if not wanted & set(range(seg[0], seg[1] + 1)):
            continue
        for st in source.states((seg[0], min(seg[1], max(steps)))):
            if st.step not in wanted:
                continue
            diag, b = stepper.stability_matrix_diag(st)
            beta = max(beta, b)
            rows = source.rows(st.ids)
            x = torch.randn(1, stepper.rec.n_params, generator=gen, dtype=stepper.dtype)
            x = x / x.norm()
            radius = 0.0
            for _ in range(iters):
                _, hx, _ = stepper.work.terms(st.theta.to(stepper.dtype), rows, x)
                y = diag * hx
                radius = float(y.norm())
                if radius == 0 or not math.isfinite(radius):
                    break
                x = y / radius
            radii.append(radius)
    top = max(radii) if radii else 0.0
    rho = 1.0 if top <= 0 or not math.isfinite(top) else min(1.0, (1.0 + beta) / top)
    return rho, radii


def adjoint_influence(
    model: nn.Module,
    recording: Recording | str | os.PathLike,
    train_data,
    loss_fn: Callable,
    queries,
    output_fn: Callable,
    *,
    reduction: str = "mean",
    jacobian: str = "loo",
    damping: float | str = "auto",
    last_steps: int | None = None,
    n_train: int | None = None,
    dtype: torch.dtype | None = None,
    query_block: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    info: dict | None = None,
) -> np.ndarray:
    """Trajectory-aware influence of every training sample on every query (DESIGN.md §2b).

    Args:
        model: the trained architecture (its parameter names and shapes must match the
            recording; its weights are not used: the pass starts from the recording's final
            weights, with a warning when the model's differ). Never modified (a copy is used).
        recording: a :class:`~inrun_shapley.trajectory.Recording` or its directory.
        train_data: the training set, indexable by sample id: ``train_data[ids]``, a tuple/list
            or dict of tensors indexed row-wise, or a function ``ids -> batch``; the batch is
            handed to ``loss_fn``.
        loss_fn: ``fn(model, batch) -> [B]`` per-sample training losses; the training loss was
            their mean (``reduction="mean"``) or sum (``"sum"``). Must call the model as
            ``model(...)`` and be deterministic (no dropout).
        queries: whatever ``output_fn`` takes.
        output_fn: ``fn(model, queries) -> [Q]``: the measured outputs (margin, loss, log-prob).
        reduction: ``"mean"`` or ``"sum"``, how the training loss reduced the per-sample losses.
        jacobian: Adam's step Jacobian: ``"loo"`` (default), ``"fixed_state"`` or ``"full"``
            (module docstring: what each one is the exact derivative of). Ignored for SGD.
        damping: ``"auto"`` (the stability rule of the module docstring) or ``ρ`` in (0, 1]
            (1 = none) scaling the curvature term.
        last_steps: propagate through the last K recorded steps only (earlier steps get nothing).
        n_train: rows of the result (default: largest recorded id + 1).
        dtype: compute dtype (default: the recording's).
        query_block: queries per batched Hessian-vector product (default: all at once).
        checkpoint: file for the adjoint state; the pass resumes from it when it exists and
            belongs to the same recording and settings, and saves it every ``checkpoint_every``
            steps and at the end.
        log_path: also write the result as a per-query value log
            (:class:`~inrun_shapley.log.ShapleyLogWriter`, one entry at the last recorded step,
            metadata ``kind="adjoint_influence"``; note the sign convention above).
        progress: show a tqdm progress bar.
        info: a dict filled with diagnostics (``rho``, ``radii``, ``steps``, ``seconds``,
            ``replay_error``, ``resumed_from``).

    Returns:
        ``[n_train, Q]`` float64 scores; ``scores[i, q] > 0``: including sample i raises ``f_q``.

    Raises:
        LogError: no (complete) recording at ``recording``.
        ConfigurationError: the model does not match the recording; the optimizer state needed
            by Adam was not recorded; bad arguments or a checkpoint from another pass.
        NonFiniteError: the propagation produced NaN/inf (lower ``damping``).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from inrun_shapley import ShapleyTracker
        >>> from inrun_shapley.trajectory import TrajectoryRecorder
        >>> from inrun_shapley.posthoc.adjoint import adjoint_influence
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1)
        >>> tracker = ShapleyTracker(model, opt, val_data=(x[:2], y[:2]), val_loss_fn=loss)
        >>> rec = TrajectoryRecorder(tempfile.mkdtemp() + "/run.traj")
        >>> tracker.add_step_listener(rec)
        >>> for s in range(4):
        ...     ids = torch.arange(4) + 4 * (s % 2)
        ...     with tracker.batch(ids):
        ...         loss(model, (x[ids], y[ids])).mean().backward()
        ...     opt.step(); opt.zero_grad()
        >>> rec.close()
        >>> scores = adjoint_influence(model, rec.path, (x, y), loss, x[:2], lambda m, q: m(q)[:, 0],
        ...                            damping=1.0, progress=False)
        >>> scores.shape
        (8, 2)
    """
    t0 = time.perf_counter()
    if reduction not in ("mean", "sum"):
        raise ConfigurationError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if jacobian not in JACOBIANS:
        raise ConfigurationError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
    if not (damping == "auto" or (isinstance(damping, (int, float)) and not isinstance(damping, bool)
                                  and 0 < damping <= 1)):
        raise ConfigurationError(f"damping must be 'auto' or a float in (0, 1], got {damping!r}")
    if last_steps is not None and (not isinstance(last_steps, int) or last_steps < 1):
        raise ConfigurationError(f"last_steps must be a positive int or None, got {last_steps!r}")
    if checkpoint_every < 1:
        raise ConfigurationError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
    rec = recording if isinstance(recording, Recording) else Recording.load(recording)
    _check_model(model, rec)
    if rec.optimizer == "adam" and not rec.manifest.get("optimizer_state", True):
        raise ConfigurationError(
            f"{rec.path}: Adam's optimizer state was not recorded (optimizer_state=False); the adjoint pass "
            "needs it for the step Jacobian J_s: record with TrajectoryRecorder(..., optimizer_state=True)"
        )
    dtype = dtype or rec.dtype
    work = _Work(model, rec, dtype, loss_fn, reduction, query_block)
    stepper = _Stepper(rec, work, jacobian, dtype)
    source = _Source(rec, stepper, train_data, dtype)
    queries = _cast(queries, dtype)

    theta_final = rec.final_theta().to(dtype)
    current = torch.cat([p.detach().reshape(-1).to(dtype) for p in
                         (dict(model.named_parameters())[n] for n in rec.names)])
    if float((current - theta_final).abs().max()) > 1e-5 * max(float(theta_final.abs().max()), 1e-12):
        warnings.warn("the model's weights differ from the recording's final weights; the pass starts from the "
                      "recording's (the model only gives the architecture)", stacklevel=2)
    lam = _query_gradients(work, theta_final, output_fn, queries, query_block)
    n_q = lam.shape[0]
    first = rec.first_step if last_steps is None else max(rec.first_step, rec.last_step - last_steps + 1)
    last = rec.last_step
    n_rows = (rec.max_id() + 1) if n_train is None else int(n_train)
    scores = torch.zeros(n_rows, n_q, dtype=torch.float64)
    carry: dict[str, Tensor] = {}
    fingerprint = {
        "run_id": rec.manifest["run_id"], "first": first, "last": last, "jacobian": jacobian,
        "damping": str(damping), "reduction": reduction, "Q": n_q, "P": rec.n_params, "n_rows": n_rows,
        "query_sum": float(lam.double().sum()), "query_abs": float(lam.double().abs().sum()),
    }
    position = last  # steps > position are done
    rho, radii = None, []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    resumed_from = None
    if ckpt_path is not None and ckpt_path.is_file():
        saved = torch.load(ckpt_path, weights_only=True)
        fp = saved["fingerprint"]
        same = all(
            math.isclose(fp.get(k), v, rel_tol=1e-6, abs_tol=1e-12) if isinstance(v, float) else fp.get(k) == v
            for k, v in fingerprint.items()
        )
        if not same:
            raise ConfigurationError(
                f"{ckpt_path} holds the state of a different adjoint pass (recording, settings or queries differ); "
                "delete it or pass another checkpoint path"
            )
        lam, scores = saved["lam"].to(dtype), saved["scores"]
        carry = {k: v.to(dtype) for k, v in saved["carry"].items()}
        position, rho, radii = int(saved["position"]), float(saved["rho"]), list(saved["radii"])
        resumed_from = position

    if rho is None:
        if damping == "auto":
            span = list(range(first, last + 1))
            probes = sorted({span[round(i * (len(span) - 1) / 7)] for i in range(8)}) if len(span) > 1 else span
            rho, radii = stability_damping(stepper, source, probes)
        else:
            rho = float(damping)

    def save(pos: int) -> None:
        if ckpt_path is None:
            return
        tmp = ckpt_path.with_name(f".{ckpt_path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": fingerprint, "position": pos, "lam": lam, "carry": carry, "scores": scores,
                    "rho": rho, "radii": radii}, tmp)
        os.replace(tmp, ckpt_path)

    segments = [seg for seg in source.segments(first, last) if seg[0] <= position]
    bar = tqdm(total=position - first + 1, disable=not progress, desc="adjoint pass", unit="step")
    done_since_save = 0
    for seg in reversed(segments):
        states = [st for st in source.states(seg) if first <= st.step <= position]
        for st in reversed(states):
            if not bool(np.all(st.updated)):
                missing = [rec.names[j] for j in np.flatnonzero(~st.updated)]
                raise ConfigurationError(f"step {st.step}: parameters {missing} had no gradient; the adjoint needs "
                                         "every optimized parameter to take part in every step")
            rows = source.rows(st.ids)
            lam, carry, dots = stepper.reverse(st, rows, lam, carry, rho)
            if not torch.isfinite(lam).all():
                raise NonFiniteError(
                    f"adjoint pass: non-finite adjoint at step {st.step} (rho={rho:.3g}); lower damping"
                )
            scores.index_add_(0, torch.from_numpy(st.ids.astype(np.int64)), dots.T.double())
            position = st.step - 1
            bar.update(1)
            done_since_save += 1
            if done_since_save >= checkpoint_every:
                save(position)
                done_since_save = 0
    bar.close()
    save(position)
    result = scores.numpy()
    if log_path is not None:
        from inrun_shapley.log import ShapleyLogWriter

        seen = np.unique(np.concatenate([rec.ids(s) for s in range(first, last + 1)]))
        with ShapleyLogWriter(log_path, n_queries=n_q, record_steps=False, flush_every=0, metadata={
            "kind": "adjoint_influence", "sign": "positive = including the sample raises f_q",
            "jacobian": jacobian, "rho": rho, "steps": [first, last], "recording": str(rec.path),
        }) as w:
            w.add_step(last, seen, result[seen])
    if info is not None:
        info.update(rho=rho, radii=radii, steps=(first, last), seconds=time.perf_counter() - t0,
                    replay_error=source.max_replay_error, resumed_from=resumed_from,
                    bytes_per_step=rec.bytes_per_step)
    return result


__all__ = ["JACOBIANS", "adjoint_influence", "stability_damping"]
