"""Brute-force references shared by the tests.

Everything here is written from the definitions, independently of the library's adapters and
capture rules: per-sample gradients by ``torch.func.vmap(grad)``, optimizer steps re-implemented
from torch's documented update (using a snapshot of the state *before* the step rather than the
library's recovery formulas), Hessian-vector products by forward-over-reverse, and exact Shapley
values by enumerating every subset.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def per_sample_grads(model: nn.Module, loss_of_row: Callable, rows: tuple) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` gradient of ``loss_of_row(model_out_fn, *row)`` for each row."""
    params = trainable(model)

    def one(params, *row):
        batched = tuple(r.unsqueeze(0) for r in row)
        return loss_of_row(lambda *a: functional_call(model, params, a), *batched)

    return vmap(grad(one), in_dims=(None,) + (0,) * len(rows))(params, *rows)


def per_sample_grads_loop(model: nn.Module, loss_of_row: Callable, rows: tuple) -> dict[str, torch.Tensor]:
    """:func:`per_sample_grads` one row at a time (``torch.func.grad`` per row, no ``vmap``): for
    modules without batching rules (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``)."""
    params = trainable(model)
    b = rows[0].shape[0]
    per_row = []
    for i in range(b):
        row = tuple(r[i : i + 1] for r in rows)
        per_row.append(grad(lambda p: loss_of_row(lambda *a: functional_call(model, p, a), *row))(params))
    return {n: torch.stack([g[n] for g in per_row]) for n in params}


def loss_grad(model: nn.Module, loss_fn: Callable[[Callable], torch.Tensor], params=None) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_fn(forward)`` at ``params`` (default: the model's current ones)."""
    params = trainable(model) if params is None else params
    return grad(lambda p: loss_fn(lambda *a: functional_call(model, p, a)))(params)


def hvp(model: nn.Module, loss_fn: Callable, params: dict, vec: dict) -> dict:
    """Hessian of ``loss_fn`` at ``params`` times ``vec`` (forward-over-reverse)."""
    g = lambda p: grad(lambda q: loss_fn(lambda *a: functional_call(model, q, a)))(p)  # noqa: E731
    return jvp(g, (params,), (vec,))[1]


def dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


# ----------------------------------------------------------------- optimizer steps
def snapshot_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Optimizer state and hyperparameters per parameter name, before the step (deep copies)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            out[by_id[id(p)]] = (copy.deepcopy(hyper), copy.deepcopy(dict(optimizer.state.get(p, {}))))
    return out


def make_step(kind: str, snap: dict, theta: dict, g_full: dict, frozen: bool) -> Callable[[dict], dict]:
    """``g_S -> theta_next`` for one optimizer step from the pre-step snapshot.

    ``frozen=True`` freezes Adam's second moment at the value the real step (gradient
    ``g_full``) produces: the fixed-state linearization. ``frozen=False`` is the real step.
    """

    def step(g_s: dict) -> dict:
        out = {}
        for name, th in theta.items():
            hyper, state = snap[name]
            s = -1.0 if hyper.get("maximize") else 1.0
            lr, wd = float(hyper["lr"]), float(hyper["weight_decay"])
            if kind == "sgd":
                mu, damp, nest = hyper["momentum"], hyper["dampening"], hyper["nesterov"]
                g = s * g_s[name] + wd * th
                buf_prev = state.get("momentum_buffer")
                if mu == 0:
                    upd = g
                else:
                    buf = g if buf_prev is None else mu * buf_prev + (1 - damp) * g
                    upd = g + mu * buf if nest else buf
                out[name] = th - lr * upd
            else:
                b1, b2 = hyper["betas"]
                eps = hyper["eps"]
                decoupled = hyper.get("decoupled_weight_decay", False)
                t = float(state["step"]) + 1 if "step" in state else 1.0
                m_prev = state.get("exp_avg", torch.zeros_like(th))
                v_prev = state.get("exp_avg_sq", torch.zeros_like(th))
                base = th * (1 - lr * wd) if decoupled else th

                def eff(gs):
                    return s * gs + (wd * th if (wd and not decoupled) else 0.0)

                g = eff(g_s[name])
                v_src = eff(g_full[name]) if frozen else g
                v = b2 * v_prev + (1 - b2) * v_src**2
                if hyper.get("amsgrad"):
                    v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(th)), v)
                m = b1 * m_prev + (1 - b1) * g
                out[name] = base - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        return out

    return step


# ----------------------------------------------------------------- reference values
def reference_values(step_fn, theta, contributions, g_val, order=1, hvp_fn=None) -> torch.Tensor:
    """docs/math.md §2 values from a (fixed-state) step function and per-sample contributions.

    ``phi_i = -<g_v, δ_i> - δ_iᵀ H (d0 + ½ Σ_j δ_j)`` (second term only for ``order=2``), with
    ``δ_i = step({c_i}) - step(∅)`` and ``d0 = step(∅) - θ``.
    """
    names = list(theta)
    b = next(iter(contributions.values())).shape[0]
    zero = {n: torch.zeros_like(theta[n]) for n in names}
    base = step_fn(zero)
    deltas = []
    for i in range(b):
        nxt = step_fn({n: contributions[n][i] for n in names})
        deltas.append({n: nxt[n] - base[n] for n in names})
    vals = torch.stack([-dot(g_val, d) for d in deltas])
    if order == 2:
        u = {n: (base[n] - theta[n]) + 0.5 * sum(d[n] for d in deltas) for n in names}
        hu = hvp_fn(u)
        vals = vals - torch.stack([dot(d, hu) for d in deltas])
    return vals


def reference_loo(step_fn_real, g_full, contributions, g_val) -> torch.Tensor:
    """Linearized leave-one-out: ``-<g_v, d step / d g · c_i>`` at the full-batch gradient."""
    b = next(iter(contributions.values())).shape[0]
    vals = []
    for i in range(b):
        _, tangent = jvp(step_fn_real, (g_full,), ({n: c[i] for n, c in contributions.items()},))
        # where every sample's gradient is exactly 0 (e.g. a padding row), v = 0 and the chain
        # rule gives 0·inf: the true tangent there is 0.
        tangent = {n: torch.nan_to_num(v, nan=0.0) for n, v in tangent.items()}
        vals.append(-dot(g_val, tangent))
    return torch.stack(vals)


def exact_shapley(utility: Callable[[tuple[int, ...]], float], n: int) -> torch.Tensor:
    """Exact Shapley values by enumerating all ``2^n`` subsets."""
    u = {}
    for r in range(n + 1):
        for subset in itertools.combinations(range(n), r):
            u[subset] = float(utility(subset))
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r in range(n):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                with_i = tuple(sorted(s + (i,)))
                phi[i] += w * (u[with_i] - u[s])
    return phi


def exact_shapley_per_id(utility: Callable[[tuple[int, ...]], float], ids) -> dict[int, float]:
    """Exact Shapley values of a step drawn with replacement: every row (occurrence) is a player
    of the game (``utility`` takes a subset of row positions), and an id's value is the sum of
    its occurrences' values."""
    ids = [int(i) for i in ids]
    phi = exact_shapley(utility, len(ids))
    out: dict[int, float] = {}
    for i, v in zip(ids, phi.tolist()):
        out[i] = out.get(i, 0.0) + v
    return out


def relative_error(got, ref) -> float:
    got = torch.as_tensor(got, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def per_sample_direction_dots(model: nn.Module, loss_of_row: Callable, rows: tuple, directions: dict,
                              loop: bool = False) -> torch.Tensor:
    """``[B]``: each row's gradient (``torch.func`` per-sample gradients) dotted with ``directions``
    (``{param name: tensor of the parameter's shape}``; parameters not named count zero).
    ``loop``: one row at a time (:func:`per_sample_grads_loop`)."""
    grads = (per_sample_grads_loop if loop else per_sample_grads)(model, loss_of_row, rows)
    b = next(iter(grads.values())).shape[0]
    return torch.stack([sum((grads[k][i] * directions[k]).sum() for k in directions) for i in range(b)])


def reference_midpoint(step_fn_real, g_full, contributions, val_grad_at) -> torch.Tensor:
    """The midpoint rule from its definition (docs/math.md §3): with ``Δ`` the real update as a
    function of the gradient (``step_fn_real(g) = θ_t + Δ(g)``), ``G = g_full``,

        ``φ_i = -<∇L_val(θ_t + Δ(G/2)), J_Δ(G/2)·c_i>``,

    the Jacobian-vector product by forward-mode autograd through the update.

    Args:
        step_fn_real: ``{name: g} -> {name: θ_next}`` (the real optimizer step from its pre-step
            state, e.g. ``make_step(kind, snap, theta, None, frozen=False)``).
        g_full: ``{name: G}`` the gradient the optimizer used.
        contributions: ``{name: [B, *shape]}`` per-sample contributions (summing to ``G``).
        val_grad_at: ``{name: θ} -> {name: ∇L_val(θ)}``.
    """
    half = {n: g / 2 for n, g in g_full.items()}
    g_half = val_grad_at(step_fn_real(half))
    b = next(iter(contributions.values())).shape[0]
    vals = []
    for i in range(b):
        _, tangent = jvp(step_fn_real, (half,), ({n: c[i] for n, c in contributions.items()},))
        tangent = {n: torch.nan_to_num(v, nan=0.0) for n, v in tangent.items()}
        vals.append(-dot(g_half, tangent))
    return torch.stack(vals).detach()
