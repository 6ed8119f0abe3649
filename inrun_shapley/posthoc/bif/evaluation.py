"""Evaluating per-sample losses and observables on the traced samples at the current weights.

``train_samples`` and ``queries`` come either as one in-memory batch (a tensor, or a
tuple/list/dict of tensors with a shared leading dimension; cut into chunks of
``eval_batch_size`` rows) or as a non-shuffling ``DataLoader``. Every draw evaluates them in the
same order, so row ``i`` of each result is always the same sample.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from inrun_shapley.batches import leading_dim, slice_rows
from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif.config import LossFn


def iter_chunks(source: Any, size: Optional[int], what: str) -> Iterator[Any]:
    """Yield ``source`` in a fixed order: a DataLoader's batches, or ``size``-row chunks.

    Args:
        source: one batch (tensor or nested tuple/list/dict of tensors) or a ``DataLoader``.
        size: rows per chunk of an in-memory batch; None = one chunk.
        what: the argument's name, for error messages.

    Raises:
        ConfigurationError: ``source`` is a shuffling ``DataLoader``.
    """
    if isinstance(source, DataLoader):
        if isinstance(source.sampler, RandomSampler):
            raise ConfigurationError(
                f"{what}: the DataLoader shuffles (RandomSampler); every draw must see the samples in "
                "the same order. Build it with shuffle=False."
            )
        yield from source
        return
    n = leading_dim(source)
    if size is None or n is None or n <= size:
        yield source
        return
    for start in range(0, n, size):
        yield slice_rows(source, start, start + size)


def evaluate(
    model: nn.Module, fn: LossFn, source: Any, size: Optional[int], what: str, per_sample: bool
) -> torch.Tensor:
    """Evaluate ``fn`` on every chunk of ``source`` and concatenate the rows.

    Args:
        model: the model, passed to ``fn`` as is (the caller sets eval mode and ``no_grad``).
        fn: ``fn(model, chunk) -> [B]`` or ``[B, ...]`` values.
        source: see :func:`iter_chunks`.
        size: rows per chunk (see :func:`iter_chunks`).
        what: the argument's name, for error messages.
        per_sample: average trailing dims away (training losses ``[n]``); otherwise keep them
            (observables ``[n, ...]``, e.g. per-token).

    Returns:
        ``[n]`` (``per_sample``) or ``[n, ...]`` detached values, on the model's device.

    Raises:
        ConfigurationError: ``fn`` returned a scalar or a non-tensor, no chunk at all, or chunks
            with different trailing shapes.
    """
    outputs = []
    for chunk in iter_chunks(source, size, what):
        out = fn(model, chunk)
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            got = "a scalar tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigurationError(
                f"{what}: the function must return per-sample values of shape [B] or [B, ...] "
                f"(reduction='none'), got {got}."
            )
        out = out.detach()
        if per_sample and out.dim() > 1:
            out = out.reshape(out.shape[0], -1).mean(dim=1)
        outputs.append(out)
    if not outputs:
        raise ConfigurationError(f"{what}: no batch to evaluate (empty input).")
    shapes = {tuple(o.shape[1:]) for o in outputs}
    if len(shapes) > 1:
        raise ConfigurationError(
            f"{what}: chunks returned different per-sample shapes {sorted(shapes)}; pad sequences to "
            "one length (and mask padding in the observable)."
        )
    return torch.cat(outputs, dim=0)


__all__ = ["evaluate", "iter_chunks"]
