"""One per-id accumulator: sums of declared fields over a sparse id space.

Used by the value-log writer (running totals and the delta of each flush), the log reader (base
snapshot plus deltas), the log merge across ranks, and the tracker's in-memory store (and its
merge across DDP ranks).

Sample ids are non-negative int64: dataset indices, global row numbers of a sharded corpus, or
hashes. Storage grows with the number of *distinct ids seen*, never with the largest id: one
row per seen id in insertion order, plus a sorted index ``id -> row``. The index has two levels,
a large sorted main part and a small sorted tail that new ids go into; the tail is merged into
the main part when it outgrows an eighth of it, so adding a step costs
``O(batch · log n)`` plus amortized ``O(1)`` per new id.

**Dense views.** ``dense(name)`` returns a ``[max_id + 1, ...]`` array indexed by id (0 for ids
never seen), which is convenient for dataset indices. It is refused with a
:class:`~inrun_shapley.errors.SampleIdError` when the id space is sparse, i.e. when
``max_id + 1 > max(DENSE_MIN, DENSE_RATIO · n_seen)`` (2**24 ids, or 4 slots per seen id):
a dense float64 view is then at most 128 MiB or 32 bytes per seen id. Use :meth:`ids` with
:meth:`table`, or :meth:`lookup` at chosen ids, instead.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.log.fields import Field

DENSE_MIN = 2**24
DENSE_RATIO = 4
_TAIL_MIN = 4096


def dense_allowed(max_id: int, n_seen: int) -> bool:
    """Whether a ``[max_id + 1]`` dense view is within the documented bound."""
    return max_id + 1 <= max(DENSE_MIN, DENSE_RATIO * n_seen)


INT64_MAX = int(np.iinfo(np.int64).max)


def refuse_ids_above_int64(ids: Any, what: str = "ids") -> None:
    """Raise, naming the caller's own numbers, when ``ids`` holds integers of ``2**63`` or more
    (numpy ``uint64`` hashes, or Python ints, which numpy would turn into floats).

    Raises:
        SampleIdError: some id does not fit in int64.
    """
    arr = np.asarray(ids)
    if arr.dtype.kind == "u" and arr.size:
        big = arr[arr > INT64_MAX]
        big_list = [int(v) for v in big[:5].tolist()]
    elif arr.dtype.kind in "fO" and arr.size and not isinstance(ids, np.ndarray):
        items = np.asarray(ids, dtype=object).ravel().tolist()
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            return
        big_list = [int(v) for v in items if int(v) > INT64_MAX][:5]
    else:
        return
    if big_list:
        raise SampleIdError(
            f"{what} must be below 2**63 (they are stored as int64), got {big_list}: for 64-bit hashes keep "
            "63 bits, e.g. ids & (2**63 - 1) or ids >> 1, as numpy int64"
        )


def check_ids(ids: np.ndarray, what: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array of non-negative ids.

    Raises:
        SampleIdError: not 1-D, not integers, negative, or above the int64 range.
    """
    refuse_ids_above_int64(ids, what)
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise SampleIdError(f"{what} must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise SampleIdError(f"{what} must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and int(ids.min()) < 0:
        raise SampleIdError(f"{what} must be non-negative int64 ids in [0, 2**63), got min {int(ids.min())}")
    return ids


class IdAccumulator:
    """Per-id sums of declared fields.

    Args:
        fields: the per-id fields (see :mod:`inrun_shapley.log.fields`); every one is summed.

    Example:
        >>> import numpy as np
        >>> from inrun_shapley.log.fields import id_fields
        >>> acc = IdAccumulator(id_fields(None, standardized=False))
        >>> acc.add(np.array([7, 10**12]), {"value_sum": np.array([0.5, -1.0]), "count": 1})
        >>> acc.add(np.array([7, 7]), {"value_sum": np.array([0.25, 0.25]), "count": 1})
        >>> acc.ids().tolist(), acc.table()["value_sum"].tolist(), acc.table()["count"].tolist()
        ([7, 1000000000000], [1.0, -1.0], [3, 1])
    """

    def __init__(self, fields: Sequence[Field]) -> None:
        self.fields = {f.name: f for f in fields}
        self._n = 0
        self._row_ids = np.zeros(0, np.int64)  # id of each row, insertion order
        self._data = {f.name: f.zeros(0) for f in fields}
        self._main_ids, self._main_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._tail_ids, self._tail_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)

    @classmethod
    def from_table(cls, fields: Sequence[Field], table: Mapping[str, np.ndarray]) -> "IdAccumulator":
        """An accumulator holding ``table`` (``ids`` sorted and unique, fields aligned to them)."""
        acc = cls(fields)
        acc.add_table(table)
        return acc

    # -- lookup ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def max_id(self) -> int:
        """Largest id seen, -1 when empty."""
        return int(self._row_ids[: self._n].max()) if self._n else -1

    def _find(self, ids: np.ndarray) -> np.ndarray:
        rows = np.full(ids.shape, -1, np.int64)
        for index_ids, index_rows in ((self._main_ids, self._main_rows), (self._tail_ids, self._tail_rows)):
            if index_ids.size:
                pos = np.minimum(np.searchsorted(index_ids, ids), index_ids.size - 1)
                hit = index_ids[pos] == ids
                rows[hit] = index_rows[pos[hit]]
        return rows

    def _consolidate(self) -> None:
        if self._tail_ids.size:
            pos = np.searchsorted(self._main_ids, self._tail_ids)
            self._main_ids = np.insert(self._main_ids, pos, self._tail_ids)
            self._main_rows = np.insert(self._main_rows, pos, self._tail_rows)
            self._tail_ids, self._tail_rows = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def _reserve(self, n: int) -> None:
        cap = self._row_ids.shape[0]
        if n <= cap:
            return
        cap = max(n, 2 * cap, 1024)
        self._row_ids = np.concatenate([self._row_ids[: self._n], np.zeros(cap - self._n, np.int64)])
        for name, f in self.fields.items():
            self._data[name] = np.concatenate([self._data[name][: self._n], f.zeros(cap - self._n)])

    def _rows(self, uniq: np.ndarray) -> np.ndarray:
        """Rows of the sorted unique ``uniq``, creating rows for ids not seen yet."""
        rows = self._find(uniq)
        new = rows < 0
        k = int(new.sum())
        if k:
            new_ids = uniq[new]
            new_rows = np.arange(self._n, self._n + k, dtype=np.int64)
            self._reserve(self._n + k)
            self._row_ids[self._n : self._n + k] = new_ids
            self._n += k
            rows[new] = new_rows
            pos = np.searchsorted(self._tail_ids, new_ids)
            self._tail_ids = np.insert(self._tail_ids, pos, new_ids)
            self._tail_rows = np.insert(self._tail_rows, pos, new_rows)
            if self._tail_ids.size > max(_TAIL_MIN, self._main_ids.size // 8):
                self._consolidate()
        return rows

    # -- adding ----------------------------------------------------------------------------

    def add(self, ids: np.ndarray, columns: Mapping[str, np.ndarray | int | float]) -> None:
        """Add ``columns[name][k]`` to the row of ``ids[k]`` for every named field.

        Args:
            ids: ``[n]`` non-negative int64 ids; duplicates add up.
            columns: field name -> ``[n, *shape]`` array (or a scalar broadcast to it, e.g.
                ``count=1``). Fields not named are left unchanged.
        """
        ids = check_ids(ids)
        unknown = set(columns) - set(self.fields)
        if unknown:
            raise ConfigurationError(f"no such fields {sorted(unknown)}; declared: {sorted(self.fields)}")
        if not ids.size:
            return
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = self._rows(uniq)[inverse.ravel()]
        for name, col in columns.items():
            data = self._data[name]
            col = np.broadcast_to(np.asarray(col, dtype=data.dtype), (ids.size, *self.fields[name].shape))
            if uniq.size == ids.size:
                data[rows] += col
            else:
                np.add.at(data, rows, col)

    def add_table(self, table: Mapping[str, np.ndarray]) -> None:
        """Add another accumulator's :meth:`table` (or a table read from disk)."""
        self.add(table["ids"], {k: v for k, v in table.items() if k != "ids" and k in self.fields})

    def merge(self, other: "IdAccumulator") -> None:
        """Add every row of ``other`` (same fields)."""
        self.add_table(other.table())

    # -- reading ---------------------------------------------------------------------------

    def ids(self) -> np.ndarray:
        """``[n_seen]`` sorted ids seen at least once (a copy)."""
        self._consolidate()
        return self._main_ids.copy()

    def table(self) -> dict[str, np.ndarray]:
        """``{"ids": [n_seen] sorted, <field>: [n_seen, *shape] aligned to ids}``; copies."""
        self._consolidate()
        out = {"ids": self._main_ids.copy()}
        for name in self.fields:
            out[name] = self._data[name][self._main_rows]
        return out

    def totals(self) -> dict[str, np.ndarray]:
        """The same as :meth:`table` (the name the tracker and the log use)."""
        return self.table()

    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Field ``name`` at ``ids`` (any order, duplicates allowed); 0 for ids never seen."""
        ids = check_ids(ids)
        rows = self._find(ids)
        out = self.fields[name].zeros(ids.shape[0])
        hit = rows >= 0
        out[hit] = self._data[name][rows[hit]]
        return out

    def dense(self, name: str) -> np.ndarray:
        """``[max_id + 1, *shape]`` view of field ``name`` indexed by id; 0 for ids never seen.

        Raises:
            SampleIdError: the id space is sparse (see the module docstring for the bound).
        """
        size = self.max_id + 1
        if not dense_allowed(self.max_id, self._n):
            raise SampleIdError(
                f"ids are sparse (largest id {self.max_id}, {self._n} ids seen): a dense array indexed "
                f"by id would have {size} rows. Use the sparse API instead: totals() (the seen ids and "
                "their sums aligned to them), on the tracker, the log writer and ShapleyLog alike"
            )
        out = self.fields[name].zeros(size)
        out[self._row_ids[: self._n]] = self._data[name][: self._n]
        return out


__all__ = ["DENSE_MIN", "DENSE_RATIO", "INT64_MAX", "IdAccumulator", "check_ids", "dense_allowed",
           "refuse_ids_above_int64"]
