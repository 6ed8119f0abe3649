"""Batched backward passes with a narrow fallback to a loop.

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under ``vmap``; an
operation without a batching rule makes it raise. Only that failure falls back to one backward
per row (slower, same numbers), with one warning naming the place. Every other error, out of
memory above all, is raised: a silent switch to a loop would hide it and run far slower.
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch

__all__ = ["batched_or_loop", "is_batching_failure"]

T = TypeVar("T")

_BATCHING_MARKERS = ("batching rule", "vmap", "batched")
_warned: set[str] = set()


def is_batching_failure(err: BaseException) -> bool:
    """True for the error a batched (vmapped) backward raises on an op it cannot batch; False
    for out-of-memory and every other error."""
    if not isinstance(err, RuntimeError) or isinstance(err, torch.OutOfMemoryError):
        return False
    message = str(err).lower()
    if "out of memory" in message:
        return False
    return any(marker in message for marker in _BATCHING_MARKERS)


def batched_or_loop(batched: Callable[[], T], loop: Callable[[], T], what: str) -> T:
    """``batched()``, or ``loop()`` if it failed for lack of a batching rule (warned once per ``what``).

    Args:
        batched: the batched computation.
        loop: the same result, one row at a time.
        what: what is being computed, for the warning.

    Raises:
        Whatever ``batched()`` raised when it is not a batching failure (e.g. out of memory).
    """
    try:
        return batched()
    except RuntimeError as err:
        if not is_batching_failure(err):
            raise
        if what not in _warned:
            _warned.add(what)
            warnings.warn(
                f"inrun-shapley: {what}: the batched backward failed ({str(err).splitlines()[0][:200]}); "
                "falling back to one backward per query (same values, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        return loop()
