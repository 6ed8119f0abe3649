"""Dataset helpers: give every training row a stable sample id."""

from __future__ import annotations

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item also carries its index as sample id.

    Items become dicts: ``{"index": i, **fields}``. A dict item keeps its keys; a tuple item
    ``(x, y)`` becomes ``{"index": i, "input": x, "target": y}`` (longer tuples: ``"input"``
    holds the first field, then ``"field1"``, ``"field2"``, ...); any other item becomes
    ``{"index": i, "input": item}``. With the default collate function a batch then has
    ``batch["index"]``: the ids the tracker and the callbacks need.

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if isinstance(item, dict):
            if "index" in item:
                raise KeyError("the dataset's items already have an 'index' key")
            return {"index": index, **item}
        if isinstance(item, (tuple, list)):
            if len(item) == 2:
                return {"index": index, "input": item[0], "target": item[1]}
            out = {"index": index, "input": item[0]}
            out.update({f"field{k}": v for k, v in enumerate(item[1:], start=1)})
            return out
        return {"index": index, "input": item}
