"""The step-sum consistency check (docs/math.md §6).

Every estimator scores a sample by ``<M, c_i>`` with one direction ``M`` per step, and the
contributions ``c_i`` of a step's samples add up to the gradient the optimizer used. So the values
of a step must sum to ``<M, ḡ>`` (``ḡ`` = ``p.grad`` after unscaling and clipping), which costs one
dot product per parameter. A mismatch beyond rounding means the values are wrong: a gradient
changed inside the capture block (clipping or scaling before the block's exit), a loss term or a
module output the capture did not see, a layer that mixes samples, or another tool rewriting
gradients. The check then warns once or raises.

Not checked: steps with ghost-path layers (their directions are never materialized) and
data-parallel runs (``p.grad`` holds every rank's gradient; each rank scores only its own).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.errors import AttributionError, ConfigurationError

__all__ = ["CHECK_MODES", "StepSumError", "StepSumCheck", "nonfinite_training_step"]

CHECK_MODES = ("warn", "raise", "off")


class StepSumError(AttributionError):
    """A step's values do not add up to the step's gradient: the values would be wrong."""


def _tolerance(compute_dtype: torch.dtype, low_precision: bool) -> float:
    if low_precision:  # fp16/bf16 captures: products rounded to ~3 significant digits
        return 5e-2
    return 1e-8 if compute_dtype == torch.float64 else 2e-3


class StepSumCheck:
    """Compares each step's value sum with ``<M, ḡ>``.

    Args:
        mode: ``"warn"`` (one warning per tracker, naming the causes), ``"raise"``
            (:class:`StepSumError`) or ``"off"``.
    """

    def __init__(self, mode: str = "warn"):
        if mode not in CHECK_MODES:
            raise ConfigurationError(f"step_check must be one of {CHECK_MODES}, got {mode!r}")
        self.mode = mode
        self.warned = False
        self.last_error: float | None = None  # relative mismatch of the last checked step

    def dots(self, directions: Mapping[int, Tensor], params: Sequence[Tensor], used_grads: Sequence[Tensor | None],
             ) -> tuple[Tensor, list[int]] | None:
        """``<M_p, ḡ_p>`` per parameter on the device, ``[P, Q]`` float64, and the ids of those
        parameters (None when no parameter has both): the check's device side, no host read."""
        have = [(p, g) for p, g in zip(params, used_grads) if g is not None and id(p) in directions]
        if not have:
            return None
        rows = [(directions[id(p)].reshape(directions[id(p)].shape[0], -1) @ g.reshape(-1).to(directions[id(p)].dtype))
                for p, g in have]
        return torch.stack(rows).double(), [id(p) for p, _ in have]

    def __call__(self, step: int, host, *, dot_params: Sequence[int] | None,
                 module_params: Mapping[str, Sequence[Tensor]], compute_dtype: torch.dtype,
                 low_precision: bool) -> None:
        """Check one step, on the host.

        Args:
            step: the step number (for the message).
            host: the step's :class:`~inrun_shapley.engine.step_io.HostStep` (scaled ``values``
                ``[n, Q]``, ``module_totals [G, Q]``, ``dots [P, Q]`` from :meth:`dots`).
            dot_params: ids of the parameters of ``host.dots``' rows (None: nothing to check).
            module_params: the tracked modules' parameters by module name (order of
                ``module_totals``).
            compute_dtype: the dtype values were computed in.
            low_precision: some capture was fp16/bf16.
        """
        if self.mode == "off" or dot_params is None or host.dots is None:
            return
        values = host.values
        expected = host.dots.sum(0)  # [Q]
        got = values.reshape(values.shape[0], -1).sum(0)
        scale = np.abs(values).reshape(values.shape[0], -1).sum(0) + np.abs(expected) + 1e-300
        err = float(np.max(np.abs(got - expected) / scale))
        self.last_error = err
        if err <= _tolerance(compute_dtype, low_precision):
            return
        per_param = dict(zip(dot_params, host.dots))
        message = (
            f"step {step}: the step's values sum to {float(got.ravel()[0]):.6g} but the gradient the optimizer "
            f"used gives {float(expected.ravel()[0]):.6g} (relative mismatch {err:.2g}): these values are wrong. "
            "Likely causes: gradients clipped or rescaled inside `with tracker.batch(...)` (clip after the "
            "block: the norm is read at its exit); a loss term or module output the capture did not see "
            "(outputs in nested containers, a penalty on parameters added to the loss); a layer that mixes "
            "the samples of a batch (BatchNorm in train mode); another tool's hooks rewriting gradients."
            + self._offenders(host.module_totals, module_params, per_param)
        )
        if self.mode == "raise":
            raise StepSumError(message + " (step_check='warn' to continue with a warning)")
        if not self.warned:
            warnings.warn(message + " (warned once; step_check='raise' stops instead)", RuntimeWarning, stacklevel=5)
            self.warned = True

    def unvalued(self, step: int, names: list[str]) -> None:
        """Parameters that started training after this step's micro-batches were captured (unfrozen
        or added to the optimizer between the backward and ``step()``): their part of the step
        has no values. Reported like a mismatching sum; they are valued from the next micro-batch."""
        if self.mode == "off" or not names:
            return
        message = (f"step {step}: parameters {names} started training after this step's batches were captured "
                   "(unfrozen or added to the optimizer between backward and step()): their part of the step "
                   "is not in the values. Change what trains before the forward of a step")
        if self.mode == "raise":
            raise StepSumError(message + " (step_check='warn' to continue with a warning)")
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    @staticmethod
    def _offenders(module_totals, module_params, per_param) -> str:
        if module_totals is None:
            return ""
        uses: dict[int, int] = {}
        for ps in module_params.values():
            for p in ps:
                uses[id(p)] = uses.get(id(p), 0) + 1
        rows = []
        for j, (name, ps) in enumerate(module_params.items()):
            if any(uses[id(p)] > 1 for p in ps):  # tied weights: the split per module is not defined
                continue
            exp = sum((per_param[id(p)] for p in ps if id(p) in per_param), np.zeros(module_totals.shape[1:]))
            got = module_totals[j]
            gap = float(np.max(np.abs(got - exp)))
            rel = gap / (float(np.max(np.abs(exp))) + float(np.max(np.abs(got))) + 1e-300)
            if rel > 1e-3:
                rows.append((rel, name or "<root>"))
        if not rows:
            return ""
        rows.sort(reverse=True)
        return " Modules whose part does not add up: " + ", ".join(f"{n} ({r:.2g})" for r, n in rows[:5]) + "."


def nonfinite_training_step(params: Sequence[Tensor], step: int, ids: Sequence[int]):
    """The error to raise when a step failed on a non-finite number that came from training.

    A NaN in one training row makes the step's gradient NaN; the optimizer then writes NaN
    parameters, and the first thing to fail is the validation loss at the new point, which
    would blame the validation set. Called only on that failure path (reads ``.grad`` and the
    parameters once).

    Returns:
        A :class:`~inrun_shapley.errors.NonFiniteError` naming the step's training rows, or None
        when the gradients and parameters are finite (the validation side is then at fault).
    """
    from inrun_shapley.errors import NonFiniteError

    def finite(t) -> bool:
        return t is None or bool(torch.isfinite(t.detach()).all())

    if all(finite(p.grad) and finite(p) for p in params):
        return None
    shown = ", ".join(str(i) for i in list(ids)[:10]) + (", ..." if len(ids) > 10 else "")
    return NonFiniteError(
        f"step {step}: the training gradient is NaN or infinite (and the optimizer step wrote it into "
        f"the parameters), so nothing could be scored; the validation set is not at fault. A training "
        f"row of this step (ids {shown}) gave a non-finite loss or gradient: check those rows, lower the "
        "learning rate, or use a GradScaler that skips such steps. The step was not counted "
        "(tracker.step unchanged)"
    )
