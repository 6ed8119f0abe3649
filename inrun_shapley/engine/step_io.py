"""The step's one transfer to the host: values, the step-sum check's inputs and every flag.

Everything a step hands to the host (the scaled values, their per-module split and totals, the
step-sum check's per-parameter dot products, and the flags: non-finite validation losses, a fused
optimizer's skipped step, non-finite values) is packed into one float64 tensor on the device and
read once: on a GPU the step waits for the device once. The scalar work on what was read (the
gradient scale, scaling the values, the non-finite test) is done on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.engine.scoring import ScoredStep
from inrun_shapley.errors import NonFiniteError
from inrun_shapley.host_reads import declared_read

__all__ = ["HostStep", "to_host"]

VALIDATION_NOT_FINITE = (
    "the validation loss is NaN or infinite at this step; check val_loss_fn and the "
    "model (a diverging run makes every value meaningless)"
)


@dataclass
class HostStep:
    """One step's results on the host (float64 numpy arrays).

    Attributes:
        ids: ``[n]`` int64 sample ids, micro-batch order.
        values: ``[n]`` (``[n, Q]`` per query) scaled values.
        groups: ``[n, G]`` per tracked module, or None.
        module_totals: ``[G, Q]`` each tracked module's part of the step's sum.
        dots: ``[P, Q]`` the step-sum check's ``<M_p, ḡ_p>``, or None.
        skipped: a fused optimizer skipped the step (``found_inf``): nothing to keep.
    """

    ids: np.ndarray
    values: np.ndarray
    groups: np.ndarray | None
    module_totals: np.ndarray
    dots: np.ndarray | None
    skipped: bool = False


def to_host(scored: ScoredStep, dots: tuple[Tensor, list] | None, flags: Sequence[Tensor], found_inf=None, *,
            grad_sq_backward: Tensor | None = None, grad_sq_now: Tensor | None = None, grad_scale=None,
            world_size: int = 1, per_query: bool = False, step: int = 0) -> HostStep:
    """Read the step's values, the check's inputs and every flag at once, then scale on the host.

    Everything that leaves the device is packed into one float64 vector by one ``cat`` (values,
    per-module split and totals, the check's dot products, the two gradient norms, a fused
    optimizer's ``grad_scale`` and ``found_inf``, the validation flags); the gradient scale, the
    scaling and the non-finite test are scalar or host-array work after the read, so the device
    runs one kernel for all of it.

    The scale between captured contributions and the gradient the optimizer used is
    ``sqrt(|ḡ_used|² / |ḡ_backward|²)`` (gradient clipping and loss-scale unscaling; 1 without an
    end-of-backward reading, 0 where the backward gradient was 0), divided by a fused optimizer's
    ``grad_scale`` and by the number of data-parallel ranks averaging gradients.

    Args:
        scored: the step's values on the device (:func:`~inrun_shapley.engine.scoring.score_micro_batches`).
        dots: the step-sum check's ``([P, Q] tensor, parameter ids)``, or None.
        flags: 0-d boolean device tensors, true where a validation loss was not finite.
        found_inf: a fused optimizer's ``found_inf`` (non-zero: the step was skipped), or None.
        grad_sq_backward: ``|ḡ|²`` at the end of backward (0-d float64 device tensor), or None.
        grad_sq_now: ``|ḡ|²`` of the gradients the optimizer used (None: no gradient).
        grad_scale: a fused optimizer's ``grad_scale`` (tensor or float), or None.
        world_size: data-parallel ranks averaging gradients.
        per_query: keep ``values`` as ``[n, Q]`` (else ``[n]``).
        step: the step number (for messages).

    Raises:
        NonFiniteError: a validation loss or a value is NaN or infinite (not for a skipped step).
    """
    device = scored.values.device

    def flat(t) -> Tensor:
        t = torch.as_tensor(t)
        return (t if t.device == device else t.to(device)).reshape(-1)

    parts = [scored.values.reshape(-1)]
    if scored.groups is not None:
        parts.append(scored.groups.reshape(-1))
    parts.append(scored.module_totals.reshape(-1))
    if dots is not None:
        parts.append(flat(dots[0]))
    sizes = [p.numel() for p in parts]
    with_norms = grad_sq_backward is not None
    if with_norms:
        parts.append(flat(grad_sq_backward))
        parts.append(flat(0.0 if grad_sq_now is None else grad_sq_now))
    scale_on_device = isinstance(grad_scale, Tensor)
    if scale_on_device:  # fused optimizers unscale inside the kernel, in float32
        parts.append(flat(grad_scale.float()))
    if found_inf is not None:
        parts.append(flat(found_inf).sum().reshape(1))
    if flags:
        parts.append(torch.stack([f if f.device == device else f.to(device) for f in flags]))
    packed = torch.cat(parts)
    if packed.dtype != torch.float64:
        packed = packed.double()
    with declared_read():  # the step's one device read
        host = (packed if packed.device.type == "cpu" else packed.cpu()).numpy()
    out, at = [], 0
    for size in sizes:
        out.append(host[at:at + size])
        at += size
    scale = 1.0
    if with_norms:
        before, now = float(host[at]), float(host[at + 1])
        scale = math.sqrt(now / before) if before > 0 else 0.0
        at += 2
    if scale_on_device:
        scale /= float(host[at])
        at += 1
    elif grad_scale is not None:
        scale /= float(np.float32(grad_scale))
    scale /= world_size
    skipped = False
    if found_inf is not None:
        skipped = bool(host[at] > 0)
        at += 1
    bad_val = bool((host[at:] > 0).any())
    values, q = out[0], scored.values.shape[1]
    n = values.size // q
    vals = values.reshape(n, q) * scale
    g = 0 if scored.groups is None else scored.groups.shape[1]
    result = HostStep(ids=scored.ids.numpy(), values=vals if per_query else vals[:, 0].copy(),
                      groups=None if scored.groups is None else out[1].reshape(n, g) * scale,
                      module_totals=out[-2 if dots is not None else -1].reshape(scored.module_totals.shape) * scale,
                      dots=None if dots is None else out[-1].reshape(dots[0].shape), skipped=skipped)
    if skipped:
        return result
    if bad_val:
        raise NonFiniteError(VALIDATION_NOT_FINITE)
    bad_values = int((~np.isfinite(vals)).sum())
    if bad_values:
        raise NonFiniteError(
            f"step {step}: {bad_values} sample value(s) are NaN or "
            "infinite: the training loss or its gradients were not finite (lower the learning "
            "rate, check the data, or use a GradScaler that skips such steps)"
        )
    return result
