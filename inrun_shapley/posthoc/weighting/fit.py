"""Fitting group weights with the label-free objective (see the package docstring).

For every query take the current top-k training samples by the weighted score and minimize::

    L(θ) = −mean_q [ mean_{i ∈ topk_q} τ(i, q; w) / ‖τ(·, q; w)‖₂ ] + λ · penalty(w),

    w = G · softmax(θ),  τ(i, q; w) = Σ_j w_j · C_j(i, q).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.weighting.components import GroupComponents
from inrun_shapley.posthoc.weighting.weights import GroupWeights


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit_weights`.

    Attributes:
        top_k: training samples per query in the objective's numerator (the current top-k by
            the weighted score, re-selected at every evaluation).
        penalty: λ, strength of the pull toward uniform weights.
        penalty_kind: ``"l2"``: ``mean_j (w_j − 1)²``; ``"kl"``: ``KL(w/G ‖ uniform)``.
        steps: optimizer iterations (Adam steps, or LBFGS max iterations).
        lr: optimizer step size on θ.
        optimizer: ``"adam"`` or ``"lbfgs"``.
        max_queries: fit on at most this many queries (drawn with ``seed``); None = all.
        seed: seeds the query subsample and the restarts' initial θ.
        restarts: optimizer runs; run 0 starts uniform, the others from random θ.
        init_noise: standard deviation of the random initial θ of runs 1, 2, ...
    """

    top_k: int = 10
    penalty: float = 0.05
    penalty_kind: str = "l2"
    steps: int = 200
    lr: float = 0.05
    optimizer: str = "adam"
    max_queries: int | None = None
    seed: int = 0
    restarts: int = 8
    init_noise: float = 2.0

    def __post_init__(self):
        problems = []
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1 (got {self.top_k})")
        if self.penalty < 0:
            problems.append(f"penalty must be >= 0 (got {self.penalty})")
        if self.penalty_kind not in ("l2", "kl"):
            problems.append(f"penalty_kind must be 'l2' or 'kl' (got {self.penalty_kind!r})")
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.optimizer not in ("adam", "lbfgs"):
            problems.append(f"optimizer must be 'adam' or 'lbfgs' (got {self.optimizer!r})")
        if self.max_queries is not None and self.max_queries < 1:
            problems.append(f"max_queries must be >= 1 or None (got {self.max_queries})")
        if self.restarts < 1:
            problems.append(f"restarts must be >= 1 (got {self.restarts})")
        if self.init_noise < 0:
            problems.append(f"init_noise must be >= 0 (got {self.init_noise})")
        if problems:
            raise ConfigurationError("Invalid FitConfig: " + "; ".join(problems))


def group_weight_objective(
    theta: torch.Tensor,
    components: torch.Tensor,
    top_k: int,
    penalty: float = 0.0,
    penalty_kind: str = "l2",
) -> torch.Tensor:
    """The label-free objective (pure function, differentiable in ``theta``).

    Args:
        theta: ``[G]`` logits; ``w = G · softmax(theta)``.
        components: ``[G, n_train, n_query]``.
        top_k: training samples per query in the numerator (clipped to ``n_train``).
        penalty: λ.
        penalty_kind: ``"l2"`` (``mean_j (w_j − 1)²``) or ``"kl"`` (``Σ_j (w_j/G) log w_j``).

    Returns:
        Scalar ``−mean_q[mean_{i∈topk_q} τ(i,q;w) / ‖τ(·,q;w)‖₂] + λ·penalty(w)``; lower is
        better. The top-k set is chosen on the detached scores (no gradient through selection).
    """
    G = components.shape[0]
    p = torch.softmax(theta, dim=0)
    w = G * p
    tau = torch.einsum("j,jnq->nq", w, components)
    norms = tau.norm(dim=0).clamp_min(torch.finfo(tau.dtype).tiny)
    k = min(top_k, tau.shape[0])
    idx = tau.detach().topk(k, dim=0).indices
    concentration = tau.gather(0, idx).mean(dim=0) / norms
    value = -concentration.mean()
    if penalty:
        if penalty_kind == "l2":
            value = value + penalty * ((w - 1.0) ** 2).mean()
        else:
            value = value + penalty * (p * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))).sum()
    return value


def _fit_from(C: torch.Tensor, theta0: torch.Tensor, config: FitConfig):
    """One optimizer run from ``theta0``; returns (best objective, best θ, trace)."""
    theta = theta0.clone().requires_grad_(True)
    trace: list[float] = []
    best = [float("inf"), theta0.clone()]

    def evaluate() -> torch.Tensor:
        val = group_weight_objective(theta, C, config.top_k, config.penalty, config.penalty_kind)
        v = float(val.detach())
        trace.append(v)
        if v < best[0]:
            best[0], best[1] = v, theta.detach().clone()
        return val

    if config.optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=config.lr)
        for _ in range(config.steps):
            opt.zero_grad()
            evaluate().backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS([theta], lr=config.lr, max_iter=config.steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            val = evaluate()
            val.backward()
            return val

        opt.step(closure)
    with torch.no_grad():
        evaluate()
    return best[0], best[1], trace


def fit_weights(
    components: GroupComponents,
    config: FitConfig | None = None,
    aspect: str | None = None,
) -> GroupWeights:
    """Fit group weights on one set of query components with the label-free objective.

    The objective has several local minima (typically one near uniform and others where a
    group is switched off), so the fit runs ``config.restarts`` times: once from uniform
    (θ = 0) and from seeded Gaussian θ with std ``config.init_noise``; each run keeps the lowest
    objective it saw, and the run with the lowest objective wins (ties go to the uniform start).
    The choice looks at the objective only, never at held-out labels. Deterministic for a given
    ``config.seed``.

    Args:
        components: ``[G, n_train, n_query]`` components; the queries are the fitting set.
        config: fitting options (default :class:`FitConfig`).
        aspect: a name stored with the weights.

    Returns:
        :class:`GroupWeights` in ``components.group_names`` order. ``objective_trace`` is the
        winning run's trace (``trace[0]`` = its start); ``fit_info`` holds
        ``uniform_objective`` (objective at w = 1), ``restart_objectives`` (best of each run,
        run 0 = uniform start) and ``winner``. ``min(trace) <= uniform_objective`` always.
    """
    config = config or FitConfig()
    values = components.values
    gen = torch.Generator().manual_seed(config.seed)
    if config.max_queries is not None and components.n_query > config.max_queries:
        pick = torch.randperm(components.n_query, generator=gen)[: config.max_queries]
        values = values[:, :, np.sort(pick.numpy())]
    C = torch.as_tensor(values, dtype=torch.float64)
    scale = float(np.abs(values).max()) or 1.0
    C = C / scale  # the objective is scale-invariant in C; this keeps the numbers near 1
    G = C.shape[0]
    starts = [torch.zeros(G, dtype=torch.float64)]
    starts += [
        config.init_noise * torch.randn(G, generator=gen, dtype=torch.float64)
        for _ in range(config.restarts - 1)
    ]
    runs = [_fit_from(C, t0, config) for t0 in starts]
    winner = min(range(len(runs)), key=lambda r: (runs[r][0], r))
    _, theta, trace = runs[winner]
    weights = (G * torch.softmax(theta, dim=0)).numpy()
    info = {
        "uniform_objective": runs[0][2][0],
        "restart_objectives": [r[0] for r in runs],
        "winner": winner,
        "scale": scale,
    }
    return GroupWeights(components.group_names, weights, aspect, np.array(trace), asdict(config), info)


def fit_group_weights(
    aspects: Mapping[str, GroupComponents], config: FitConfig | None = None
) -> dict[str, GroupWeights]:
    """One weight vector per aspect: ``{aspect name: components of its query set}``.

    Each aspect's queries should isolate that aspect (e.g. queries of one class, one task).

    Returns:
        ``{aspect name: GroupWeights}`` fitted independently with the same ``config``.
    """
    if not aspects:
        raise ConfigurationError("fit_group_weights needs at least one aspect")
    names = {a: c.group_names for a, c in aspects.items()}
    first = next(iter(names.values()))
    bad = [a for a, n in names.items() if n != first]
    if bad:
        raise ConfigurationError(
            f"aspects {bad} have other group names than {next(iter(names))!r}; compute all "
            "aspects' components with the same ParameterGroups"
        )
    return {a: fit_weights(c, config, aspect=a) for a, c in aspects.items()}


__all__ = ["FitConfig", "fit_group_weights", "fit_weights", "group_weight_objective"]
