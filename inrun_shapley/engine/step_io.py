"""The step's one transfer to the host: values, the step-sum check's inputs and every flag.

Everything a step hands to the host (the scaled values, their per-module split and totals, the
step-sum check's per-parameter dot products, and the flags: non-finite validation losses, a fused
optimizer's skipped step, non-finite values) is packed into one float64 tensor on the device and
read once (DESIGN §7 "Host reads"): on a GPU the step waits for the device once.
"""

from __future__ import annotations

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


def to_host(scored: ScoredStep, scale: Tensor | float, dots: tuple[Tensor, list] | None, flags: Sequence[Tensor],
            found_inf=None, *, per_query: bool = False, step: int = 0) -> HostStep:
    """Scale the step's values on the device, fold the flags in, and read them all at once.

    Args:
        scored: the step's values on the device (:func:`~inrun_shapley.engine.scoring.score_micro_batches`).
        scale: the gradient scale (clipping, loss scaling, ranks), a 0-d tensor or a float.
        dots: the step-sum check's ``([P, Q] tensor, parameter ids)``, or None.
        flags: 0-d boolean device tensors, true where a validation loss was not finite.
        found_inf: a fused optimizer's ``found_inf`` (non-zero: the step was skipped), or None.
        per_query: keep ``values`` as ``[n, Q]`` (else ``[n]``).
        step: the step number (for messages).

    Raises:
        NonFiniteError: a validation loss or a value is NaN or infinite (not for a skipped step).
    """
    device = scored.values.device
    scale = torch.as_tensor(scale, dtype=torch.float64).to(device)
    values = scored.values.double() * scale
    parts = [values.reshape(-1)]
    groups = None
    if scored.groups is not None:
        groups = scored.groups.double() * scale
        parts.append(groups.reshape(-1))
    totals = scored.module_totals.double() * scale
    parts.append(totals.reshape(-1))
    if dots is not None:
        parts.append(dots[0].to(device).reshape(-1))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    bad_val = torch.stack([f.to(device) for f in flags]).sum().double() if flags else zero
    skipped = torch.as_tensor(found_inf).to(device).double().sum() if found_inf is not None else zero
    bad_values = (~torch.isfinite(values)).sum().double()
    parts.append(torch.stack([bad_val, skipped, bad_values]))
    packed = torch.cat(parts)
    with declared_read():  # the step's one device read
        flat = (packed if packed.device.type == "cpu" else packed.cpu()).numpy()
    ids = scored.ids.numpy()
    n, q = values.shape
    g = 0 if groups is None else groups.shape[1]
    out, at = [], 0
    for size in (n * q, n * g, totals.numel(), 0 if dots is None else dots[0].numel()):
        out.append(flat[at:at + size])
        at += size
    bad_val, skipped, bad_values = flat[at:at + 3]
    vals = out[0].reshape(n, q)
    host = HostStep(ids=ids, values=vals if per_query else vals[:, 0].copy(),
                    groups=None if groups is None else out[1].reshape(n, g), module_totals=out[2].reshape(totals.shape),
                    dots=None if dots is None else out[3].reshape(dots[0].shape), skipped=bool(skipped > 0))
    if host.skipped:
        return host
    if bad_val > 0:
        raise NonFiniteError(VALIDATION_NOT_FINITE)
    if bad_values > 0:
        raise NonFiniteError(
            f"step {step}: {int(bad_values)} sample value(s) are NaN or "
            "infinite: the training loss or its gradients were not finite (lower the learning "
            "rate, check the data, or use a GradScaler that skips such steps)"
        )
    return host
