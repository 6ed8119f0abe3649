"""The declared fields of a value log: what is kept, with one reduction each.

Two kinds of state, each with a single reduction that makes flushing, resuming and merging
across ranks generic:

* **per-id fields** (reduction ``sum``): one row per sample id, summed over steps, over the
  delta chunks of one log and over the logs of several ranks. ``count`` is a sum of ones.
* **per-step tables** (reduction ``concat``): rows appended per step, concatenated over flushes
  and ranks.

=================  ==========================================================  ============
field              meaning                                                     reduction
=================  ==========================================================  ============
``value_sum``      sum over steps of the value (``[Q]`` per query)             sum
``count``          number of steps the id appeared in                          sum
``std_sum``        sum over steps of value / (that step's scale), per query    sum
``group_sum``      ``value_sum`` split over the G parameter groups             sum
step records       ``(step, id, value[, group_value])`` rows                   concat
step stats         ``(step, n, mean, m2, scale)`` per step (always kept)       concat
=================  ==========================================================  ============
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Field:
    """One per-id quantity, summed.

    Attributes:
        name: array name in memory and on disk.
        shape: trailing shape of one id's row (``()`` scalar, ``(Q,)``, ``(G,)``).
        dtype: numpy dtype of the rows.
        meaning: one line for the docs.
    """

    name: str
    shape: tuple[int, ...] = ()
    dtype: type = np.float64
    meaning: str = ""

    def zeros(self, n: int) -> np.ndarray:
        """``[n, *shape]`` zeros of this field's dtype."""
        return np.zeros((n, *self.shape), dtype=self.dtype)


def value_shape(n_queries: int | None) -> tuple[int, ...]:
    """Trailing shape of one value: ``()`` for a single direction, ``(Q,)`` per query."""
    return () if n_queries is None else (int(n_queries),)


def id_fields(n_queries: int | None, n_groups: int = 0, *, standardized: bool = True) -> tuple[Field, ...]:
    """The per-id fields of a value log (``standardized``) or of the in-memory store.

    Args:
        n_queries: Q, or None for 1-D values.
        n_groups: G parameter groups (0: no ``group_sum``).
        standardized: include ``std_sum`` (the on-disk log keeps it; the in-memory store not).
    """
    shape = value_shape(n_queries)
    fields = [
        Field("value_sum", shape, np.float64, "sum over steps of the value"),
        Field("count", (), np.int64, "number of steps the id appeared in"),
    ]
    if standardized:
        fields.append(Field("std_sum", shape, np.float64, "sum of per-step standardized values"))
    if n_groups:
        fields.append(Field("group_sum", (int(n_groups),), np.float64, "value_sum per group"))
    return tuple(fields)


def record_dtype(n_queries: int | None, n_groups: int) -> np.dtype:
    """Row type of the per-step records table (reduction: concat)."""
    fields: list[tuple] = [("step", np.int64), ("id", np.int64), ("value", np.float64, value_shape(n_queries))]
    if n_groups:
        fields.append(("group_value", np.float64, (n_groups,)))
    return np.dtype(fields)


def stats_dtype(n_queries: int | None) -> np.dtype:
    """Row type of the per-step statistics table (reduction: concat)."""
    shape = value_shape(n_queries)
    return np.dtype(
        [("step", np.int64), ("n", np.int64), ("mean", np.float64, shape), ("m2", np.float64, shape),
         ("scale", np.float64, shape)]
    )


__all__ = ["Field", "id_fields", "record_dtype", "stats_dtype", "value_shape"]
