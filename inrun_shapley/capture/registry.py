"""The table of capture rules, one per layer kind, looked up through the class's MRO.

A capture rule turns what the tracker saw of one call of a module during the ordinary training
forward/backward (its inputs ``a`` and the gradient ``b = dL/dy`` of the loss with respect to its
output) into per-row dot products between each row's gradient contribution to the module's
parameters and one or more fixed directions ``M``:

    result[n, q] = sum_p < dL_n/dtheta_p , M_p[q] >

where ``n`` runs over the first dimension of the captured tensors ("rows": samples, or
samples x positions when the model flattened a sequence into the batch dimension), ``p`` over
the module's tracked parameters and ``q`` over the directions. No per-sample gradient is
materialized for large parameters: the dot product is one extra forward of the layer with
weight ``M`` (docs/math.md §4.1).

Adding a layer kind is adding one small subclass of :class:`CaptureRule` decorated with
:func:`register_rule`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn


@dataclass
class Capture:
    """What the tracker saw of one call of one module.

    Attributes:
        args: positional inputs of the call, tensors detached (no copy).
        kwargs: keyword inputs of the call, tensors detached.
        grad_outputs: ``dL/dy`` for each tensor output of the call, in output order (``None``
            for an output that received no gradient). Filled during backward.
        rng_state: CPU (and CUDA) random state at the start of the call, kept only for rules that
            re-run the module's forward (so dropout inside a custom module replays its mask).
        autocast: ``(device type, dtype)`` of the autocast the call ran under, kept for rules that
            re-run the forward (mixed precision), else None.
        per_sample: the call had no batch dimension and an op broadcast its outputs over the
            batch: ``args``/``kwargs`` were expanded to the batch's samples, and ``grad_outputs``
            hold each sample's output gradient gathered at that op (see
            :mod:`~inrun_shapley.capture.sites`).
    """

    args: tuple
    kwargs: dict
    grad_outputs: list = field(default_factory=list)
    rng_state: Any = None
    per_sample: bool = False
    autocast: tuple | None = None

    def replay_autocast(self):
        """Context that replays the call's autocast (``torch.autocast(device_type, dtype)`` when
        the call ran under one: its ops then see the same mixed dtypes), else nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast[0], dtype=self.autocast[1])

    @property
    def grad_output(self) -> Tensor:
        """Gradient with respect to the (first) output."""
        g = self.grad_outputs[0] if self.grad_outputs else None
        if g is None:
            raise RuntimeError("no gradient was captured for this module call")
        return g

    @property
    def complete(self) -> bool:
        """True once backward delivered a gradient for at least one output."""
        return any(g is not None for g in self.grad_outputs)


def autocast_state(inputs: list) -> tuple | None:
    """``(device type, dtype)`` of the autocast active now for the device of ``inputs``' first
    tensor (None when autocast is off): kept by rules that replay a module's forward."""
    device_type = next((t.device.type for t in inputs if isinstance(t, Tensor)), "cpu")
    if torch.is_autocast_enabled(device_type):
        return device_type, torch.get_autocast_dtype(device_type)
    return None


class CaptureRule:
    """Base class of capture rules. Subclasses implement :meth:`dot`.

    Attributes:
        kind: short name shown in the tracker's module report.
        owns_children: if True the rule covers the parameters of the whole subtree (used for
            modules that use their children's weights functionally, like ``nn.MultiheadAttention``);
            the children are then not hooked themselves.
        needs_rng: if True the tracker saves the random state at each call (rules that re-run
            the module's forward).
        reads_parameters: if True the rule needs the parameter values at which the step's
            gradients were taken (``theta``); the tracker then keeps a copy of them from the step
            pre-hook, because the module's own parameters have already moved when rules run.
        broadcastable: if True a call whose input has a leading dimension of 1 in a batch of
            several samples (a module shared by every sample, like a position embedding) is
            captured with its input and output expanded to the batch, so that each sample gets
            its own output gradient (see :mod:`~inrun_shapley.engine.capture_session`).
    """

    kind: str = "rule"
    owns_children: bool = False
    needs_rng: bool = False
    reads_parameters: bool = False
    broadcastable: bool = True

    def rows(self, module: nn.Module, args: tuple, kwargs: dict) -> int | None:
        """Size of the call's row dimension: the first dimension of its first tensor input
        (positional, else keyword); None when that input has no dimension.

        Rows are samples, or samples × positions flattened sample-major into the first dimension.
        """
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            first = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        return first.shape[0] if first is not None and first.dim() > 0 else None

    def output_sample_dims(self, module: nn.Module, outputs: list[Tensor]) -> list[int]:
        """The row dimension of each tensor output (as flattened by
        :func:`~inrun_shapley.capture.outputs.tensor_leaves`): 0 unless the layer says otherwise."""
        return [0] * len(outputs)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """Trainable parameters this rule accounts for, keyed by name relative to ``module``."""
        return {
            name: p
            for name, p in module.named_parameters(recurse=self.owns_children)
            if p.requires_grad
        }

    def check(self, module: nn.Module) -> str | None:
        """Return a reason why ``module`` cannot be tracked in its current state, or None."""
        return None

    def dot(
        self,
        module: nn.Module,
        capture: Capture,
        directions: Mapping[str, Tensor],
        theta: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Per-row dot products with the directions.

        Args:
            module: the module that was called.
            capture: its captured inputs and output gradients.
            directions: ``{param_name: M}`` with ``M`` of shape ``[Q, *param.shape]`` (fp32), for
                the tracked parameters of this module (a subset of :meth:`parameters`).
            theta: ``{param_name: value}`` before the optimizer step, for rules with
                ``reads_parameters`` (None otherwise).

        Returns:
            fp32 tensor ``[N, Q]``: for each row of the first dimension of the call, the sum over
            the given parameters of ``<row's gradient contribution, M[q]>``.
        """
        raise NotImplementedError


_RULES: dict[type, CaptureRule] = {}


def register_rule(*module_types: type) -> Callable[[type[CaptureRule]], type[CaptureRule]]:
    """Class decorator registering a :class:`CaptureRule` subclass for ``module_types``.

    Lookup goes through the module class's MRO, so subclasses of a registered type use its rule.
    """

    def decorate(rule_cls: type[CaptureRule]) -> type[CaptureRule]:
        instance = rule_cls()
        for t in module_types:
            _RULES[t] = instance
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> CaptureRule | None:
    """The registered rule for ``module``'s class or its nearest registered base class.

    Returns None when no class in the MRO is registered (the caller then falls back to the
    generic forward-mode JVP rule).
    """
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def registered_types() -> list[str]:
    """Names of the module classes with a registered rule (for error messages and docs)."""
    return sorted({t.__name__ for t in _RULES})


def project(per_row_grad: Tensor, direction: Tensor) -> Tensor:
    """``[N, *shape]`` per-row gradients dotted with ``[Q, *shape]`` directions → ``[N, Q]``.

    Used for small parameters (biases, norm affines) where the per-row gradient is cheap.
    """
    n, q = per_row_grad.shape[0], direction.shape[0]
    return per_row_grad.reshape(n, -1) @ direction.reshape(q, -1).T


def up(t: Tensor) -> Tensor:
    """``t`` in the compute dtype: at least fp32 (bf16/fp16 are promoted, fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
