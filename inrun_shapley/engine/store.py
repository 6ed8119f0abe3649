"""In-memory accumulation of per-step values (the tracker's default sink).

Same ``add_step`` contract as the on-disk log writer: per optimizer step, the sample ids of the
step, their values (positive = the sample lowered the validation loss; units of validation
loss), and optionally the values split over parameter groups.
"""

from __future__ import annotations

import numpy as np
import torch


class InMemoryValues:
    """Per-sample totals (sum over steps, count of steps) and optional per-step records.

    Args:
        record_steps: also keep every (step, id, value) record.
    """

    def __init__(self, record_steps: bool = True):
        self.record_steps = record_steps
        self._sum = np.zeros(0)
        self._count = np.zeros(0, dtype=np.int64)
        self._group_sum: np.ndarray | None = None
        self.group_names: list[str] | None = None
        self.records: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.last_step = 0

    def _grow(self, max_id: int, width: tuple = ()) -> None:
        if len(self._sum) == 0 and self._sum.shape[1:] != width:
            self._sum = np.zeros((0, *width))
        if max_id < len(self._sum):
            return
        size = max(max_id + 1, 2 * len(self._sum))
        self._sum = np.concatenate([self._sum, np.zeros((size - len(self._sum), *self._sum.shape[1:]))])
        self._count = np.concatenate([self._count, np.zeros(size - len(self._count), dtype=np.int64)])
        if self._group_sum is not None:
            pad = np.zeros((size - self._group_sum.shape[0], self._group_sum.shape[1]))
            self._group_sum = np.concatenate([self._group_sum, pad])

    def add_step(self, step: int, ids: np.ndarray, values: np.ndarray, group_values: np.ndarray | None = None,
                 group_names: list[str] | None = None) -> None:
        """Add one optimizer step: ``ids [n]`` int64, ``values [n]`` (or ``[n, Q]`` per query),
        ``group_values [n, G]``."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        self._grow(int(ids.max()), values.shape[1:])
        np.add.at(self._sum, ids, values)
        np.add.at(self._count, ids, 1)
        if group_values is not None:
            if self._group_sum is None:
                self.group_names = list(group_names or [f"group{j}" for j in range(group_values.shape[1])])
                self._group_sum = np.zeros((len(self._sum), group_values.shape[1]))
            np.add.at(self._group_sum, ids, group_values)
        if self.record_steps:
            self.records.append((int(step), ids.copy(), values.copy()))
        self.last_step = int(step)

    @property
    def values(self) -> np.ndarray:
        """``[max_id + 1]`` (or ``[max_id + 1, Q]``) summed values; 0 for ids never seen."""
        return self._sum[: self._n()].copy()

    @property
    def counts(self) -> np.ndarray:
        """``[max_id + 1]`` number of steps each id took part in."""
        return self._count[: self._n()].copy()

    @property
    def group_values(self) -> np.ndarray | None:
        """``[max_id + 1, G]`` summed per-group values, or None."""
        return None if self._group_sum is None else self._group_sum[: self._n()].copy()

    def _n(self) -> int:
        nz = np.flatnonzero(self._count)
        return int(nz[-1]) + 1 if len(nz) else 0

    def step_table(self) -> dict[str, np.ndarray]:
        """All per-step records as flat arrays ``step``, ``id``, ``value``."""
        if not self.records:
            return {"step": np.zeros(0, np.int64), "id": np.zeros(0, np.int64), "value": np.zeros((0, *self._sum.shape[1:]))}
        return {
            "step": np.concatenate([np.full(len(i), s, np.int64) for s, i, _ in self.records]),
            "id": np.concatenate([i for _, i, _ in self.records]),
            "value": np.concatenate([v for _, _, v in self.records]),
        }

    def state_dict(self) -> dict:
        """Torch tensors and plain Python values only, so checkpoints load with ``weights_only=True``."""
        tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return {
            "sum": tensor(self._sum), "count": tensor(self._count), "last_step": self.last_step,
            "group_sum": tensor(self._group_sum), "group_names": self.group_names,
            "records": [(s, tensor(i), tensor(v)) for s, i, v in self.records],
        }

    def load_state_dict(self, state: dict) -> None:
        array = lambda a: None if a is None else np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a)  # noqa: E731
        self._sum, self._count = array(state["sum"]).astype(np.float64), array(state["count"]).astype(np.int64)
        self.last_step = int(state["last_step"])
        self._group_sum = array(state.get("group_sum"))
        self.group_names = state.get("group_names")
        self.records = [(int(s), array(i), array(v)) for s, i, v in state.get("records", [])]
