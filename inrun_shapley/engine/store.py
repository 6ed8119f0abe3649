"""In-memory accumulation of per-step values (the tracker's default sink).

Same ``add_step`` contract as the on-disk log writer: per optimizer step, the sample ids of the
step, their values (positive = the sample lowered the validation loss; units of validation
loss), and optionally the values split over parameter groups. Totals live in the value log's
per-id accumulator (:class:`~inrun_shapley.log.accumulator.IdAccumulator`), so sparse ids
(hashes, global row numbers) cost memory per seen id only.

Per-step records are *not* kept in memory by default (they grow linearly with the run, about
22 bytes per value): the on-disk value log keeps them. Pass ``record_steps=True`` to keep them
here too; the last step's ``(step, ids, values)`` is always available as :attr:`last_record`.
"""

from __future__ import annotations

import numpy as np
import torch

from inrun_shapley.log.accumulator import IdAccumulator
from inrun_shapley.log.fields import id_fields


class InMemoryValues:
    """Per-sample totals (sum over steps, count of steps) and optional per-step records.

    Args:
        record_steps: also keep every (step, ids, values) record in memory.

    Example:
        >>> import numpy as np
        >>> store = InMemoryValues()
        >>> store.add_step(1, np.array([2, 0]), np.array([0.5, -0.25]))
        >>> store.values.tolist(), store.counts.tolist(), store.ids.tolist()
        ([-0.25, 0.0, 0.5], [1, 0, 1], [0, 2])
    """

    def __init__(self, record_steps: bool = False):
        self.record_steps = record_steps
        self.group_names: list[str] | None = None
        self.records: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.last_record: tuple[int, np.ndarray, np.ndarray] | None = None
        self.last_step = 0
        self._acc: IdAccumulator | None = None
        self._value_shape: tuple[int, ...] = ()

    def _start(self, value_shape: tuple[int, ...], n_groups: int) -> None:
        self._value_shape = value_shape
        self._acc = IdAccumulator(id_fields(value_shape[0] if value_shape else None, n_groups, standardized=False))

    def add_step(self, step: int, ids: np.ndarray, values: np.ndarray, group_values: np.ndarray | None = None,
                 group_names: list[str] | None = None, counts: np.ndarray | None = None) -> None:
        """Add one optimizer step: ``ids [n]`` non-negative int64, ``values [n]`` (or ``[n, Q]``
        per query), ``group_values [n, G]``; ``counts [n]``: occurrences of each id in the step
        (default 1 each)."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if self._acc is None:
            n_groups = 0 if group_values is None else np.asarray(group_values).shape[1]
            if group_values is not None:
                self.group_names = list(group_names or [f"group{j}" for j in range(n_groups)])
            self._start(values.shape[1:], n_groups)
        columns = {"value_sum": values, "count": 1 if counts is None else np.asarray(counts, np.int64)}
        if group_values is not None and "group_sum" in self._acc.fields:
            columns["group_sum"] = np.asarray(group_values, dtype=np.float64)
        self._acc.add(ids, columns)
        self.last_record = (int(step), ids.copy(), values.copy())
        if self.record_steps:
            self.records.append(self.last_record)
        self.last_step = int(step)

    # -- results --------------------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """``[n_seen]`` sorted ids seen at least once."""
        return np.zeros(0, np.int64) if self._acc is None else self._acc.ids()

    def totals(self) -> dict[str, np.ndarray]:
        """Sparse totals: ``ids [n_seen]`` sorted and, aligned to them, ``value_sum``
        (``[n_seen]`` or ``[n_seen, Q]``), ``count`` and with groups ``group_sum [n_seen, G]``."""
        return {"ids": np.zeros(0, np.int64)} if self._acc is None else self._acc.table()

    def _dense(self, name: str, shape: tuple[int, ...] = ()) -> np.ndarray:
        if self._acc is None:
            return np.zeros((0, *shape), np.int64 if name == "count" else np.float64)
        return self._acc.dense(name)

    @property
    def values(self) -> np.ndarray:
        """``[max_id + 1]`` (or ``[max_id + 1, Q]``) summed values; 0 for ids never seen.

        Raises:
            SampleIdError: sparse ids (see :mod:`inrun_shapley.log.accumulator`); use
                :meth:`totals` instead.
        """
        return self._dense("value_sum", self._value_shape)

    @property
    def counts(self) -> np.ndarray:
        """``[max_id + 1]`` occurrences of each id (steps it took part in, each repeat counted)."""
        return self._dense("count")

    @property
    def group_values(self) -> np.ndarray | None:
        """``[max_id + 1, G]`` summed per-group values, or None."""
        if self._acc is None or "group_sum" not in self._acc.fields:
            return None
        return self._acc.dense("group_sum")

    def step_table(self) -> dict[str, np.ndarray]:
        """All per-step records kept in memory (``record_steps=True``) as flat arrays ``step``,
        ``id``, ``value``."""
        if not self.records:
            return {"step": np.zeros(0, np.int64), "id": np.zeros(0, np.int64),
                    "value": np.zeros((0, *self._value_shape))}
        return {
            "step": np.concatenate([np.full(len(i), s, np.int64) for s, i, _ in self.records]),
            "id": np.concatenate([i for _, i, _ in self.records]),
            "value": np.concatenate([v for _, _, v in self.records]),
        }

    # -- checkpoints and ranks --------------------------------------------------------------

    def state_dict(self) -> dict:
        """Torch tensors and plain Python values only, so checkpoints load with ``weights_only=True``.

        Totals are stored sparse: ``ids`` and rows aligned to them.
        """
        tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        t = self.totals()
        return {
            "ids": tensor(t["ids"]), "sum": tensor(t.get("value_sum", np.zeros((0, *self._value_shape)))),
            "count": tensor(t.get("count", np.zeros(0, np.int64))), "group_sum": tensor(t.get("group_sum")),
            "last_step": self.last_step, "group_names": self.group_names, "record_steps": self.record_steps,
            "records": [(s, tensor(i), tensor(v)) for s, i, v in self.records],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (also the dense layout of earlier versions, where
        ``sum``/``count`` were indexed by id and had no ``ids``)."""
        array = lambda a: None if a is None else np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a)  # noqa: E731
        value_sum, count = array(state["sum"]).astype(np.float64), array(state["count"]).astype(np.int64)
        group_sum = array(state.get("group_sum"))
        ids = array(state.get("ids"))
        if ids is None:  # dense layout: row k is id k
            ids = np.flatnonzero(count > 0).astype(np.int64)
            value_sum, count = value_sum[ids], count[ids]
            group_sum = None if group_sum is None else group_sum[ids]
        self.group_names = state.get("group_names")
        self._start(value_sum.shape[1:], 0 if group_sum is None else group_sum.shape[1])
        table = {"ids": ids.astype(np.int64), "value_sum": value_sum, "count": count}
        if group_sum is not None:
            table["group_sum"] = group_sum.astype(np.float64)
        self._acc.add_table(table)
        self.last_step = int(state["last_step"])
        self.records = [(int(s), array(i), array(v)) for s, i, v in state.get("records", [])]
        self.last_record = self.records[-1] if self.records else None

    @classmethod
    def merged(cls, parts: list["InMemoryValues"]) -> "InMemoryValues":
        """Totals of several stores summed (ranks score disjoint samples); records concatenated
        in step order."""
        out = cls(record_steps=any(p.record_steps for p in parts))
        for part in parts:
            if part._acc is None:
                continue
            if out._acc is None:
                out._start(part._value_shape, len(part.group_names or []))
                out.group_names = part.group_names
            out._acc.merge(part._acc)
        out.records = sorted((r for p in parts for r in p.records), key=lambda r: r[0])
        out.last_step = max((p.last_step for p in parts), default=0)
        return out


def merge_across_ranks(store: InMemoryValues) -> InMemoryValues:
    """Every rank's in-memory totals summed (ranks score disjoint samples); identity without
    an initialized process group. Per-step records are concatenated in step order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return store
    states: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, store.state_dict())
    parts = []
    for state in states:
        part = InMemoryValues(record_steps=bool(state.get("record_steps", store.record_steps)))
        if state["sum"] is not None and len(state["count"]):
            part.load_state_dict(state)
        parts.append(part)
    merged = InMemoryValues.merged(parts)
    merged.record_steps = store.record_steps
    return merged


__all__ = ["InMemoryValues", "merge_across_ranks"]
