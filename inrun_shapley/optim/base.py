"""What an optimizer adapter returns, and the table of adapters keyed by optimizer class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from inrun_shapley.errors import UnsupportedOptimizerError
from inrun_shapley.host_reads import declared_read


@dataclass
class StepTerms:
    """The fixed-state linearization of one parameter's update (docs/math.md §2).

    With the optimizer state frozen, the update of the parameter when only the samples in S
    contribute to the gradient is ``theta_next(S) - theta = drift + sum_{i in S} delta_i`` with
    ``delta_i = -sign * lr * coeff * precond ⊙ c_i`` (``c_i`` = sample i's contribution to the
    gradient the optimizer saw).

    Attributes:
        lr: learning rate of the parameter's group (float).
        coeff: scalar ``k`` multiplying the gradient inside the update (Adam: ``(1-β1)/(1-β1^t)``;
            SGD: 1, ``1-dampening`` with a momentum buffer, ``1+μ(1-dampening)`` with Nesterov).
        sign: +1, or -1 with ``maximize=True``.
        precond: elementwise preconditioner ``P`` (Adam: ``1/(sqrt(v_t/(1-β2^t)) + eps)``), or None
            for 1.
        drift: ``d0``, the part of the update that does not depend on this step's gradient
            (momentum, weight decay); only computed when asked for (second order).
        loo_precond: the diagonal Jacobian ``J`` of the real step with respect to the gradient,
            including the second moment's dependence on it (leave-one-out estimator); None where it
            equals ``coeff * precond``.
        jacobian: the midpoint rule's ``dΔ/dg`` at half the step's gradient (docs/math.md §3.2),
            elementwise, in parameter units per gradient unit (negative almost everywhere
            without maximize); None for the other estimators.
    """

    lr: float
    coeff: float
    sign: float = 1.0
    precond: Tensor | None = None
    drift: Tensor | None = None
    loo_precond: Tensor | None = None
    jacobian: Tensor | None = None


class OptimizerAdapter(Protocol):
    """One optimizer family's math, as pure functions (the family's module holds them).

    Besides the fixed-state :meth:`terms`, every family gives the exact step as a function of
    the gradient (docs/math.md §3): ``update(g, theta, group, state_before) -> Δ``, its diagonal
    Jacobian ``update_jacobian_diag(g, theta, group, state_before) -> dΔ/dg``, the midpoint
    pass over a param group from the state before the step (:meth:`midpoint_many`), and the state
    before the step reconstructed from the state after it,
    ``state_before_step(state_after, g, theta, group, before) -> state_before``. States are dicts
    with torch's keys.
    """

    name: str

    def update(self, g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> Tensor:
        """The parameter change torch's step makes from gradient ``g`` (shaped like ``g``)."""

    def update_jacobian_diag(self, g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> Tensor:
        """``dΔ/dg``, elementwise, shaped like ``g``."""

    def state_before_step(
        self, state_after: dict, g: Tensor, theta: Tensor | None, group: dict, before: dict | None = None
    ) -> dict:
        """The state before the step, from the state after it and the gradient it used."""

    def state_after_step(self, g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> dict:
        """The state torch holds after the step (what a replay carries on)."""

    def midpoint_step(self, g: Tensor, theta: Tensor | None, group: dict, state_before: dict) -> tuple[Tensor, Tensor]:
        """``(Δ(g/2), dΔ/dg at g/2)`` from the state before the step that uses ``g`` (the midpoint
        rule's two per-parameter quantities, docs/math.md §3.2)."""

    def midpoint_many(self, grads: list, thetas: list, group: dict, states_before: list, steps: list | None = None,
                      plus_theta: bool = False, workspace: "Workspace | None" = None) -> tuple[list, list]:
        """:meth:`midpoint_step` for every parameter of one param group at once, as list-wide
        (``torch._foreach_*``) kernels with no host read, run once the step's gradients are final
        and before the optimizer changes the parameters or the state; ``steps``: each state's
        ``step`` before the step as a host float (:func:`host_steps`), or None; ``plus_theta``:
        the first list is ``θ + Δ(g/2)``; ``workspace``: a :class:`Workspace` the results may
        live in (until its next use)."""

    def before_step(self, group: dict, state: dict) -> dict:
        """Whatever the adapter needs from the state as it was before the step."""

    def terms(
        self,
        grad: Tensor,
        group: dict,
        state: dict,
        before: dict,
        theta: Tensor | None,
        need_drift: bool,
        need_loo: bool,
    ) -> StepTerms:
        """Step terms from the gradient the optimizer used and its state after the step.

        Args:
            grad: the gradient the optimizer used (after unscaling and clipping), fp32.
            group: the parameter's param group.
            state: the optimizer state of the parameter after the step.
            before: what :meth:`before_step` returned.
            theta: the parameter before the step (fp32), given when ``need_drift``.
            need_drift: compute ``drift`` (second order).
            need_loo: compute ``loo_precond``.
        """


_ADAPTERS: dict[type, OptimizerAdapter] = {}


def register_adapter(*optimizer_types: type) -> Callable:
    """Class decorator registering an adapter for torch optimizer classes (MRO lookup)."""

    def decorate(cls):
        instance = cls()
        for t in optimizer_types:
            _ADAPTERS[t] = instance
        return cls

    return decorate


def unregister_adapter(*optimizer_types: type) -> None:
    """Remove the adapters registered for these optimizer classes (no error if absent)."""
    for t in optimizer_types:
        _ADAPTERS.pop(t, None)


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """Unwrap framework wrappers (Lightning's ``LightningOptimizer``, Accelerate's
    ``AcceleratedOptimizer``) down to the torch optimizer, through their public ``optimizer``
    attribute."""
    for _ in range(8):  # AcceleratedOptimizer is itself an Optimizer subclass: unwrap on the attribute
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def adapter_for(optimizer) -> OptimizerAdapter:
    """The adapter for ``optimizer`` (wrappers unwrapped), or UnsupportedOptimizerError."""
    inner = innermost_optimizer(optimizer)
    for cls in type(inner).__mro__:
        if cls in _ADAPTERS:
            adapter = _ADAPTERS[cls]
            for group in inner.param_groups:
                problem = getattr(adapter, "check_group", lambda g: None)(group)
                if problem:
                    raise UnsupportedOptimizerError(f"{type(inner).__name__}: {problem}")
            return adapter
    supported = ", ".join(sorted({t.__name__ for t in _ADAPTERS}))
    raise UnsupportedOptimizerError(
        f"no In-Run Shapley adapter for optimizer {type(inner).__name__}; supported: {supported} "
        "(torch.optim classes and their subclasses). Use one of them, or add an adapter with "
        "inrun_shapley.optim.register_adapter."
    )


def as_float(x) -> float:
    """Plain float from a float or a 0-d tensor (``lr``, ``step`` may be tensors)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def host_steps(states: list[dict]) -> list[float | None]:
    """Each state's ``step`` as a host float (None where it has none), with one host read for all
    the tensor-valued ones (torch keeps one 0-d ``step`` tensor per parameter; on the device for
    fused and capturable optimizers)."""
    out: list[float | None] = [None] * len(states)
    tensors: dict[torch.device, list[int]] = {}
    for i, st in enumerate(states):
        step = st.get("step") if st else None
        if isinstance(step, Tensor):
            tensors.setdefault(step.device, []).append(i)
        elif step is not None:
            out[i] = float(step)
    for idx in tensors.values():
        with declared_read():  # on the host already unless fused/capturable
            values = torch.stack([states[i]["step"].detach().reshape(()).to(torch.float64) for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


class Workspace:
    """Parameter-shaped buffers kept from one step to the next, for the list-wide kernels, and
    how those kernels run (``fused``: one compiled kernel per param group where the optimizer
    family has one, see :mod:`inrun_shapley.optim.fused`).

    On the CPU every fresh parameter-sized tensor costs page faults (the allocator hands large
    blocks back to the system when they are freed; measured: an out-of-place add over a 400k
    element tensor takes 2-5x the in-place one), so the step's kernels write into these buffers
    (``out=`` arguments). Elsewhere (CUDA's caching allocator makes fresh
    tensors free) :meth:`get` returns None and the kernels allocate as usual. The buffers hold
    values only within one step; they are memory held at rest (:attr:`nbytes`).
    """

    def __init__(self, fused: bool = False):
        self._buffers: dict = {}
        self.fused = fused

    def get(self, name, like: list[Tensor]) -> list[Tensor] | None:
        """Buffers shaped like ``like`` for the role ``name`` (None off the CPU, and for tensor
        subclasses)."""
        if not like or like[0].device.type != "cpu" or type(like[0]) not in (Tensor, torch.nn.Parameter):
            return None
        key = (self._key(name), tuple((t.shape, t.dtype) for t in like))
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        return bufs

    def scope(self, prefix) -> "Workspace":
        """A view whose roles are prefixed (one per param group: their buffers never alias)."""
        view = Workspace.__new__(Workspace)
        view._buffers, view._prefix = self._buffers, (getattr(self, "_prefix", ()), prefix)
        view.fused = self.fused
        return view

    def _key(self, name):
        return (getattr(self, "_prefix", ()), name)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for bufs in self._buffers.values() for t in bufs)


BIG = 1 << 15
"""Elements from which a fresh CPU tensor is worth avoiding (128 KiB of float32: glibc's default
threshold for handing blocks straight to and from the system); smaller ones are computed
list-wide out of place (one call for all of them)."""


def _into(out: list, fresh, one) -> list:
    """Results in ``out``'s large buffers (``one(i, buffer)`` per tensor) and, for the small
    ones, fresh tensors from one list-wide call (``fresh(indices)``); the list of results."""
    big = [i for i, o in enumerate(out) if o.numel() >= BIG]
    res = list(out)
    if len(big) < len(out):
        small = [i for i, o in enumerate(out) if o.numel() < BIG]
        for i, t in zip(small, fresh(small)):
            res[i] = t
    for i in big:
        one(i, out[i])
    return res


def fe_add(a: list, b, alpha: float = 1.0, out: list | None = None) -> list:
    """``a + alpha·b`` (``b`` a list or a scalar) list-wide; with ``out``, the large tensors are
    written into it (one ``out=`` call each: torch's foreach ``out`` variants compute out of
    place and copy). Use the returned list."""
    listed = isinstance(b, (list, tuple))
    if out is None:
        return torch._foreach_add(a, b, alpha=alpha) if listed else torch._foreach_add(a, b)
    if listed:
        return _into(out, lambda ix: torch._foreach_add([a[i] for i in ix], [b[i] for i in ix], alpha=alpha),
                     lambda i, o: torch.add(a[i], b[i], alpha=alpha, out=o))
    return _into(out, lambda ix: torch._foreach_add([a[i] for i in ix], b), lambda i, o: torch.add(a[i], b, out=o))


def fe_mul(a: list, b, out: list | None = None) -> list:
    """``a · b`` (``b`` a list or a scalar) list-wide, as :func:`fe_add`."""
    if out is None:
        return torch._foreach_mul(a, b)
    if isinstance(b, (list, tuple)):
        return _into(out, lambda ix: torch._foreach_mul([a[i] for i in ix], [b[i] for i in ix]),
                     lambda i, o: torch.mul(a[i], b[i], out=o))
    return _into(out, lambda ix: torch._foreach_mul([a[i] for i in ix], b), lambda i, o: torch.mul(a[i], b, out=o))


def fe_addcmul(a: list, b: list, c: list, value: float, out: list | None = None) -> list:
    """``a + value·b·c`` list-wide, as :func:`fe_add`."""
    if out is None:
        return torch._foreach_addcmul(a, b, c, value=value)
    return _into(out, lambda ix: torch._foreach_addcmul([a[i] for i in ix], [b[i] for i in ix], [c[i] for i in ix],
                                                        value=value),
                 lambda i, o: torch.addcmul(a[i], b[i], c[i], value=value, out=o))
