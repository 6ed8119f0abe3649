"""Walking batch structures: a tensor, or tuples/lists/dicts of them nested to any depth.

Every function here treats a batch the same way: tensors are the leaves that get transformed,
tuples (named tuples included), lists and dicts are walked, anything else (strings, numbers,
``None``) is passed through unchanged. "Rows" are the first dimension of the tensors, shared by
every tensor of one batch.

Example:
    >>> import torch
    >>> from inrun_shapley.batches import rows_of, slice_rows, take_rows
    >>> batch = {"x": torch.arange(6).reshape(3, 2), "y": torch.tensor([0, 1, 2]), "name": "toy"}
    >>> rows_of(batch)
    3
    >>> take_rows(batch, torch.tensor([2, 0]))["y"].tolist()
    [2, 0]
    >>> slice_rows(batch, 1, 3)["x"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from inrun_shapley.errors import ConfigurationError

__all__ = ["detach", "leading_dim", "map_tensors", "move_to", "rows_of", "slice_rows", "take_rows"]


def map_tensors(fn: Callable[[Tensor], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor leaf (containers rebuilt, same types)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def detach(batch: Any) -> Any:
    """Every tensor of ``batch`` detached from the autograd graph (no copy: storage shared)."""
    return map_tensors(Tensor.detach, batch)


def move_to(batch: Any, device: torch.device | str) -> Any:
    """Every tensor of ``batch`` moved to ``device`` (no copy for tensors already there)."""
    return map_tensors(lambda t: t.to(device), batch)


def leading_dim(batch: Any) -> int | None:
    """First dimension of the first tensor with at least one dimension (depth first), or None."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        n = leading_dim(item)
        if n is not None:
            return n
    return None


def rows_of(batch: Any, what: str = "batch") -> int:
    """Number of rows of ``batch``: :func:`leading_dim`, required.

    Args:
        batch: a batch structure.
        what: how the batch is named in the error message.

    Raises:
        ConfigurationError: the batch holds no tensor with a first dimension.
    """
    n = leading_dim(batch)
    if n is None:
        raise ConfigurationError(
            f"cannot find the rows of the {what} (type {type(batch).__name__}): it must be a tensor, or a "
            "tuple/list/dict of tensors sharing their first dimension"
        )
    return n


def take_rows(batch: Any, index: Tensor) -> Any:
    """Rows ``index`` (a 1-D integer tensor, moved to each tensor's device) of every tensor."""
    return map_tensors(lambda t: t[index.to(t.device)], batch)


def slice_rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor (views, no copy)."""
    return map_tensors(lambda t: t[start:stop], batch)
