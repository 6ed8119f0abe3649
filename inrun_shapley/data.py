"""Data helpers: a stable sample id for every training row, a default per-row loss, and a
validation set given as a DataLoader.

How sample ids travel without changing the batch the training code sees:

1. :class:`IndexedDataset` adds the row's id to each item as a :class:`SampleIds` tensor: as an
   extra trailing element of a tuple/list item (``(x, y)`` becomes ``(x, y, id)``), or under the
   key ``"index"`` of a dict item.
2. The default collate function stacks those into one ``[B]`` :class:`SampleIds` tensor (a tensor
   subclass, so it survives ``collate``, worker processes, pinning and ``.to(device)``): the batch
   is ``[x, y, ids]`` (``default_collate`` turns tuples into lists) or ``{..., "index": ids}``.
3. The framework adapters take the ids out of the batch IN PLACE before the training code sees it
   (``list.pop()`` / ``dict.pop("index")``), so ``x, y = batch`` in a ``training_step`` works
   unchanged. Only elements of type :class:`SampleIds` are ever removed: ids you carry yourself
   are read and left where they are. A plain loop reads them itself:
   ``for x, y, ids in loader: with tracker.batch(ids): ...``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from inrun_shapley.errors import ConfigurationError

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "input_ids", "features")
TARGET_KEYS = ("target", "targets", "y", "label", "labels")
IDS_KEY = "index"


class SampleIds(Tensor):
    """An int64 tensor of sample ids added to a batch by :class:`IndexedDataset`.

    It behaves as an ordinary tensor; its type only marks it as added by this library, so the
    adapters can remove it from the batch again (and never remove anything else).
    """


def _id_of(index: int) -> SampleIds:
    return torch.tensor(int(index), dtype=torch.int64).as_subclass(SampleIds)


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item also carries its index as its sample id.

    The item keeps its structure plus one id (see the module docstring for the whole path):

    - tuple/list item ``(x, y, ...)`` -> ``(x, y, ..., id)`` (same type); collated batch
      ``[x, y, ..., ids]``;
    - dict item -> the same dict plus ``"index": id``; collated batch ``batch["index"]``.

    With ``ShapleyCallback`` / ``ShapleyHook.batch(batch)`` the ids are removed again before your
    code sees the batch; in a plain loop unpack them: ``for x, y, ids in loader``.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``) whose items are tuples,
            lists or dicts (``TensorDataset`` gives tuples).

    Raises:
        ConfigurationError: the items are of another kind (a bare tensor, a named tuple, ...):
            an id cannot be added without changing what your code receives, or a dict item
            already has an ``"index"`` key. Return ``(x,)`` or ``{"x": x}`` items instead, or
            carry your own ids and pass ``ids_fn=`` to the adapter.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        if len(dataset) > 0:
            _check_item(dataset[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        _check_item(item)
        if isinstance(item, dict):
            return {**item, IDS_KEY: _id_of(index)}
        return type(item)([*item, _id_of(index)])


def _check_item(item: Any) -> None:
    if isinstance(item, dict):
        if IDS_KEY in item:
            raise ConfigurationError(
                f"the dataset's items already have an {IDS_KEY!r} key; keep your ids and pass "
                f"ids_fn=lambda batch: batch[{IDS_KEY!r}] to the adapter instead of IndexedDataset"
            )
        return
    if type(item) in (tuple, list):
        return
    kind = "named tuple" if isinstance(item, tuple) else type(item).__name__
    raise ConfigurationError(
        f"IndexedDataset adds the sample id as an extra element of tuple/list items or an extra key "
        f"of dict items; items of type {kind} have no room for it without changing what your "
        "training code receives. Return (x,) / (x, y) tuples or dicts from the dataset, or carry "
        "your own ids in the batch and pass ids_fn=lambda batch: <1-D tensor of ids>"
    )


def _unpack(batch) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            raise ConfigurationError(
                f"the default validation loss looks for an input key {INPUT_KEYS} and a target key "
                f"{TARGET_KEYS} in dict batches; found {sorted(batch)}. Pass val_loss_fn=fn(model, batch) "
                "returning one loss per row"
            )
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigurationError(
        f"the default validation loss needs (input, target) batches or dicts with input/target keys, got "
        f"{type(batch).__name__}; pass val_loss_fn=fn(model, batch) returning one loss per row"
    )


def default_loss(model: nn.Module, batch) -> Tensor:
    """Per-row loss of a standard supervised model, used when no ``val_loss_fn`` is given.

    ``output = model(input)`` with ``(input, target)`` taken from a tuple/list batch or from the
    dict keys ``input``/``x``/``image``/``input_ids``... and ``target``/``y``/``label``...
    Integer targets: cross-entropy (class dimension 1; for sequence outputs ``[B, T, C]`` with
    targets ``[B, T]`` the mean over positions). Floating targets: mean squared error averaged
    over all but the first dimension. Lower is better (the usual loss sign).

    Returns:
        ``[B]`` losses, one per row.
    """
    x, y = _unpack(batch)
    out = model(x)
    if not isinstance(out, Tensor):
        raise ConfigurationError(
            f"the default validation loss needs model(input) to return a tensor, got {type(out).__name__}; "
            "pass val_loss_fn=fn(model, batch)"
        )
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        if out.dim() == 3 and y.dim() == 2:
            return F.cross_entropy(out.transpose(1, 2), y.long(), reduction="none").mean(1)
        return F.cross_entropy(out, y.long(), reduction="none")
    return ((out - y.to(out.dtype)) ** 2).reshape(out.shape[0], -1).mean(1)


def _concat(parts: list):
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat([p.as_subclass(Tensor) for p in parts])
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[j] for p in parts]) for j in range(len(first)))
    raise ConfigurationError(
        f"a validation DataLoader must yield tensors, tuples/lists or dicts of tensors, got "
        f"{type(first).__name__}; pass val_data=<one batch of tensors or a Dataset> instead"
    )


def validation_rows(val_data):
    """``val_data`` as the validation objective takes it: a ``DataLoader`` becomes one in-memory
    batch of all its rows (iterated once, rows as its ``collate_fn`` makes them; order and
    ``batch_size`` do not matter for the mean loss); anything else is returned unchanged.

    Raises:
        ConfigurationError: the loader is empty or yields something that is not tensors.
    """
    if not isinstance(val_data, DataLoader):
        return val_data
    parts = list(val_data)
    if not parts:
        raise ConfigurationError("the validation DataLoader yields no batches")
    return _concat(parts)
