"""A module call's outputs as a flat list of tensors, at any nesting depth.

Modules return a tensor, or tuples, lists, dicts, named tuples or dataclasses of them nested to
any depth (``nn.LSTM`` returns ``(out, (h_n, c_n))``). The tracker hooks every tensor leaf and a
capture rule replaying the module reads the leaves in the same order, so the order is fixed:
depth first, mappings in their iteration order, dataclasses in field order. Anything else
(``None``, numbers, strings) is not a leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from torch import Tensor

__all__ = ["map_outputs", "tensor_leaves"]


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def tensor_leaves(out: Any) -> list[Tensor]:
    """Every tensor of ``out``, depth first (the order :func:`map_outputs` visits them)."""
    # A module-level recursion, not a nested recursive closure: such a closure refers to itself
    # through its cell, and the cycle kept ``leaves`` (module outputs, with their autograd graphs)
    # alive until the cyclic garbage collector ran: +80 MB per step on a small transformer.
    leaves: list[Tensor] = []
    _collect(out, leaves)
    return leaves


def _collect(obj: Any, leaves: list[Tensor]) -> None:
    if isinstance(obj, Tensor):
        leaves.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _collect(v, leaves)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _collect(v, leaves)
    elif _is_dataclass_instance(obj):
        for f in dataclasses.fields(obj):
            _collect(getattr(obj, f.name), leaves)


def map_outputs(fn: Callable[[Tensor], Tensor], out: Any) -> Any:
    """``out`` with every tensor leaf replaced by ``fn(leaf)``, containers rebuilt with their type.

    Mappings are rebuilt as ``type(out)(pairs)`` (dict, OrderedDict and dict-like model-output
    classes); dataclasses with :func:`dataclasses.replace`.
    """
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, Mapping):
        items = [(k, map_outputs(fn, v)) for k, v in out.items()]
        return type(out)(items) if type(out) is not dict else dict(items)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*(map_outputs(fn, v) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(map_outputs(fn, v) for v in out)
    if _is_dataclass_instance(out):
        changes = {f.name: map_outputs(fn, getattr(out, f.name)) for f in dataclasses.fields(out) if f.init}
        return dataclasses.replace(out, **changes)
    return out
