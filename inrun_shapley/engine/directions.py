"""From one optimizer step's terms and the validation gradient to the fixed direction ``M``.

Every estimator scores a sample by ``<M, c_i>`` with ONE direction ``M`` per parameter per step
(``[Q, *shape]`` per query with per-query values); this module holds, as pure functions of the
step terms (:class:`~inrun_shapley.optim.StepTerms`) and validation gradients, how each estimator
forms ``M`` (docs/math.md §2):

* ``midpoint`` (the default; Shapley value of the real step, exact for quadratic games,
  docs/math.md §3): ``M = -J_Δ(G/2) ⊙ ∇L_val(θ_t + Δ(G/2))`` with ``Δ`` the optimizer's real update
  as a function of the gradient, ``J_Δ`` its diagonal Jacobian and ``G`` the step's gradient
  (:func:`midpoint_terms`, :func:`midpoint_direction`);
* ``shapley`` (fixed-state Shapley): ``M = sign·lr·k · P ⊙ g_v``; second order
  ``M = sign·lr·k · P ⊙ (g_v + H_v u)`` with ``u = d0 + ½ Σ_j δ_j`` (:func:`second_order_vector`);
* ``loo`` (linearized leave-one-out of the real step): ``M = sign·lr · J ⊙ g_v``;
* ``sgd`` (SGD-form baseline): ``M = sign·lr · g_v``.

Sign: ``M`` points so that a positive ``<M, c_i>`` means sample i's presence lowered the
validation loss; values are in units of validation loss (lr included).

Adding an estimator is adding a member to :class:`Estimator`, one direction function in
:data:`DIRECTION_FNS`, and its step terms and validation point in
:meth:`~inrun_shapley.engine.step.StepPipeline.before` (the midpoint: ``θ_t + Δ(G/2)``; the
others: ``θ_t``).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Sequence

import torch
from torch import Tensor

from inrun_shapley.capture.registry import up
from inrun_shapley.errors import ConfigurationError
from inrun_shapley.optim.base import OptimizerAdapter, StepTerms, Workspace, as_float, host_steps

__all__ = [
    "DIRECTION_FNS",
    "Estimator",
    "direction",
    "ghost_factors",
    "loo_direction",
    "midpoint_direction",
    "midpoint_terms",
    "sgd_direction",
    "shapley_direction",
    "second_order_vector",
    "step_terms",
]


class Estimator(str, Enum):
    """What a value estimates; compares equal to its string (``Estimator.SHAPLEY == "shapley"``)."""

    MIDPOINT = "midpoint"
    SHAPLEY = "shapley"
    LOO = "loo"
    SGD = "sgd"

    @classmethod
    def parse(cls, value: "str | Estimator") -> "Estimator":
        """The member for ``value``.

        Raises:
            ConfigurationError: an unknown name (the message lists the known ones).
        """
        try:
            return cls(value)
        except ValueError:
            names = tuple(e.value for e in cls)
            raise ConfigurationError(f"estimator must be one of {names}, got {value!r}") from None

    def __str__(self) -> str:
        return self.value

    @property
    def needs_loo_jacobian(self) -> bool:
        """The adapter must return the real step's Jacobian (``StepTerms.loo_precond``)."""
        return self is Estimator.LOO

    @property
    def needs_theta_before(self) -> bool:
        """A copy of the parameters before the step is needed after it (the leave-one-out
        Jacobian's L2 decay terms; the midpoint reads ``θ_t`` before the step, uncopied)."""
        return self is Estimator.LOO

    @property
    def has_ghost_form(self) -> bool:
        """Its direction factorizes into the ghost products (the loo Jacobian can change sign)."""
        return self is not Estimator.LOO


def shapley_direction(terms: StepTerms, val_grad: Tensor, hvp: Tensor | None = None) -> Tensor:
    """``sign·lr·k · P ⊙ (g_v [+ H_v u])``; ``val_grad``/``hvp`` ``[*shape]`` or ``[Q, *shape]``."""
    g = val_grad if hvp is None else val_grad + hvp
    scale = terms.sign * terms.lr * terms.coeff
    # same operations and rounding as scale * (precond * g), one new buffer; never in place on
    # precond (an adapter may hand back optimizer state)
    return scale * g if terms.precond is None else torch.mul(terms.precond, g).mul_(scale)


def midpoint_direction(terms: StepTerms, val_grad: Tensor, hvp: Tensor | None = None) -> Tensor:
    """``-J ⊙ g_half``: ``terms.jacobian`` = ``dΔ/dg`` at ``G/2``, ``val_grad`` = ``∇L_val`` at
    ``θ_t + Δ(G/2)`` (``[*shape]`` or ``[Q, *shape]``). Positive ``<M, c_i>`` = the sample helped."""
    if hvp is not None:
        raise ConfigurationError("the midpoint estimator needs no Hessian-vector product: use order=1")
    if terms.jacobian is None:
        raise ConfigurationError("midpoint direction without its Jacobian (use midpoint_terms)")
    return torch.mul(terms.jacobian, val_grad).neg_()


def loo_direction(terms: StepTerms, val_grad: Tensor, hvp: Tensor | None = None) -> Tensor:
    """``sign·lr · J ⊙ g_v`` with ``J`` the real step's diagonal Jacobian (``k·P`` where the
    adapter returns none)."""
    if hvp is not None:
        raise ConfigurationError("the loo estimator is first order only")
    if terms.loo_precond is not None:
        j = terms.loo_precond
    elif terms.precond is not None:
        j = terms.coeff * terms.precond
    else:
        j = torch.full_like(val_grad, terms.coeff)
    return terms.sign * terms.lr * j * val_grad


def sgd_direction(terms: StepTerms, val_grad: Tensor, hvp: Tensor | None = None) -> Tensor:
    """``sign·lr · g_v``: the SGD-form baseline, whatever the optimizer."""
    if hvp is not None:
        raise ConfigurationError("the sgd estimator is first order only")
    return terms.sign * terms.lr * val_grad


DIRECTION_FNS: dict[Estimator, Callable[..., Tensor]] = {
    Estimator.MIDPOINT: midpoint_direction,
    Estimator.SHAPLEY: shapley_direction,
    Estimator.LOO: loo_direction,
    Estimator.SGD: sgd_direction,
}


def direction(estimator: Estimator, terms: StepTerms, val_grad: Tensor, hvp: Tensor | None = None) -> Tensor:
    """The direction ``M`` of one parameter for ``estimator`` (see :data:`DIRECTION_FNS`)."""
    return DIRECTION_FNS[estimator](terms, val_grad, hvp)


def second_order_vector(terms: StepTerms, grad: Tensor) -> Tensor:
    """``u = d0 + ½ Σ_j δ_j = d0 - ½·sign·lr·k · P ⊙ ḡ`` for one parameter (``ḡ`` = ``grad``, the
    gradient the optimizer used; needs ``terms.drift``)."""
    step_part = terms.sign * terms.lr * terms.coeff * (terms.precond * grad if terms.precond is not None else grad)
    return terms.drift - 0.5 * step_part


def ghost_factors(estimator: Estimator, terms: StepTerms) -> tuple[float, Tensor | None]:
    """``(scale, P)`` the ghost forms fold into the query side: ``(sign·lr·k, P)`` for
    ``shapley``, ``(sign·lr, None)`` for ``sgd``.

    Raises:
        ConfigurationError: the estimator has no ghost form.
    """
    if not estimator.has_ghost_form:
        raise ConfigurationError(f"the ghost path has no form for the {estimator.value!r} estimator")
    if estimator is Estimator.SHAPLEY:
        return terms.sign * terms.lr * terms.coeff, terms.precond
    if estimator is Estimator.MIDPOINT:
        # M = -J ⊙ g: scale 1 and "preconditioner" -J (> 0 almost everywhere; a constant for SGD,
        # where the ghost forms stay exact)
        return 1.0, terms.jacobian.neg()
    return terms.sign * terms.lr, None


def _used_gradients(params: Sequence[Tensor], grad_divisor: Tensor | float | None) -> list[Tensor | None]:
    """Each parameter's gradient the optimizer used, in the compute dtype (``p.grad / grad_divisor``:
    a fused optimizer's ``p.grad`` is still scaled), list-wide, with no host read."""
    grads = [None if p.grad is None else up(p.grad.detach()) for p in params]
    if grad_divisor is None or (not isinstance(grad_divisor, Tensor) and grad_divisor == 1.0):
        return grads
    have = [i for i, g in enumerate(grads) if g is not None]
    if isinstance(grad_divisor, Tensor):
        divided = [grads[i] / grad_divisor.to(grads[i].device) for i in have]
    else:
        divided = torch._foreach_div([grads[i] for i in have], grad_divisor)
    for i, g in zip(have, divided):
        grads[i] = g
    return grads


def _with_host_step(state: dict, step: float | None) -> dict:
    """``state`` with its ``step`` as a host float read beforehand (the adapters' ``as_float`` of
    it then reads nothing)."""
    return state if step is None or "step" not in state else {**state, "step": step}


def step_terms(adapter: OptimizerAdapter, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
               param_group: Sequence[int], before: Sequence[dict], theta_before: Sequence[Tensor] | None, *,
               need_drift: bool, need_loo: bool) -> tuple[list[StepTerms | None], list[Tensor | None]]:
    """Each parameter's step terms, read in the step post-hook, where ``.grad`` is the gradient
    the step used (a fused optimizer under a ``GradScaler`` divides it by ``grad_scale`` in place
    during its step).

    Args:
        adapter: the optimizer family's adapter.
        optimizer: the innermost torch optimizer (state after the step).
        params: the tracked parameters.
        param_group: index of each parameter's param group.
        before: what ``adapter.before_step`` returned for each parameter (may be empty).
        theta_before: each parameter before the step, or None.
        need_drift: compute ``d0`` (second order).
        need_loo: compute the leave-one-out Jacobian.

    Returns:
        ``(terms, grads)``: per parameter its :class:`StepTerms` (None when it was not updated)
        and the gradient the optimizer used in the compute dtype (None without gradient).
    """
    groups, state = optimizer.param_groups, optimizer.state
    grads = [None if p.grad is None else up(p.grad.detach()) for p in params]
    steps = host_steps([state.get(p, {}) for p in params])
    terms: list[StepTerms | None] = []
    for i, p in enumerate(params):
        if grads[i] is None or p not in state and adapter.name != "sgd":
            terms.append(None)
            continue
        theta = up(theta_before[i]) if theta_before is not None else None
        terms.append(adapter.terms(grads[i], groups[param_group[i]], _with_host_step(state.get(p, {}), steps[i]),
                                   before[i] if before else {}, theta, need_drift=need_drift, need_loo=need_loo))
    return terms, grads


def midpoint_terms(adapter: OptimizerAdapter, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                   param_group: Sequence[int], grad_divisor: Tensor | float | None = None,
                   workspace: Workspace | None = None,
                   ) -> tuple[list[StepTerms | None], list[Tensor], list[Tensor | None]]:
    """The midpoint rule's terms of each parameter, read once the step's gradients are final and
    before the optimizer changes anything (docs/math.md §3.2).

    With ``G`` the gradient the optimizer is about to use (``p.grad / grad_divisor``: after
    unscaling and clipping), the parameters still ``θ_t`` and the optimizer state as it is before
    the step (exact: nothing is reconstructed or copied), computes ``θ_half = θ_t + Δ(G/2)`` and
    ``J = dΔ/dg`` at ``G/2``: one list-wide call of the family's ``midpoint_many`` per param
    group, no host read but the optimizer's step counts (one read for the whole model, where
    they are tensors).

    Args:
        adapter: the optimizer family's adapter (its ``midpoint_many``).
        optimizer: the innermost torch optimizer (state before the step).
        params: the tracked parameters (``θ_t``); ``param_group`` their group indices.
        grad_divisor: a fused optimizer's ``grad_scale`` (a tensor; its ``p.grad`` is still
            scaled), or None.
        workspace: buffers kept between steps for the kernels (the results live in them until
            the next step), or None.

    Returns:
        ``(terms, theta_half, grads)``: per parameter its :class:`StepTerms` with ``jacobian`` set
        (None for parameters the step does not update: those without a gradient), ``θ_half`` in
        the parameter's dtype (``θ_t`` itself where not updated), and the gradient the optimizer
        uses in the compute dtype.
    """
    groups, state = optimizer.param_groups, optimizer.state
    grads = _used_gradients(params, grad_divisor)
    n = len(params)
    terms: list[StepTerms | None] = [None] * n
    theta_half: list[Tensor] = [p.detach() for p in params]
    by_group: dict[int, list[int]] = {}
    for i in range(n):
        if grads[i] is not None:  # torch's Adam and SGD update every parameter with a gradient
            by_group.setdefault(param_group[i], []).append(i)
    steps = host_steps([state.get(params[i], {}) for idx in by_group.values() for i in idx])
    k = 0
    for gi, idx in by_group.items():
        group = groups[gi]
        halves, jacs = adapter.midpoint_many(  # θ_t + Δ(G/2) and J, list-wide
            [grads[i] for i in idx], [up(theta_half[i]) for i in idx], group,
            [state.get(params[i], {}) for i in idx], steps[k:k + len(idx)], plus_theta=True,
            workspace=None if workspace is None else workspace.scope(gi))
        k += len(idx)
        lr = as_float(group["lr"])
        for i, h, j in zip(idx, halves, jacs):
            terms[i] = StepTerms(lr=lr, coeff=1.0, jacobian=j)
            theta_half[i] = h.to(params[i].dtype)
    return terms, theta_half, grads
