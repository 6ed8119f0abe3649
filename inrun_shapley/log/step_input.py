"""Checks of what callers hand the value-log writer: its arguments and each step's arrays."""

from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

import numpy as np

from inrun_shapley.errors import ConfigurationError, NonFiniteError, SampleIdError
from inrun_shapley.log.accumulator import check_ids, refuse_ids_above_int64


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array, a sequence or a torch tensor (without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_writer_args(
    n_queries: Any, flush_every: Any, group_names: Sequence[str] | None, metadata: Any
) -> list[str] | None:
    """Validate the writer's constructor arguments; returns ``group_names`` as a list of str.

    Raises:
        ConfigurationError: a bad argument, with what was given.
    """
    if n_queries is not None and (
        isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)) or n_queries < 1
    ):
        raise ConfigurationError(f"n_queries must be a positive int or None, got {n_queries!r}")
    if isinstance(flush_every, bool) or not isinstance(flush_every, (int, np.integer)) or flush_every < 0:
        raise ConfigurationError(f"flush_every must be an int >= 0, got {flush_every!r}")
    if group_names is not None:
        group_names = [str(g) for g in group_names]
        if not group_names or len(set(group_names)) != len(group_names):
            raise ConfigurationError(f"group_names must be non-empty and unique, got {group_names!r}")
    if metadata is not None:
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"metadata must be JSON-serializable: {exc}") from exc
    return group_names


class StepChecker:
    """Checks one step's ``ids``/``values``/``group_values`` against the log's declared shape."""

    def __init__(self) -> None:
        self.warned_groups = False

    def check(
        self, step: int, ids: Any, values: Any, group_values: Any, n_queries: int | None,
        n_queries_fixed: bool, group_names: list[str] | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]:
        """Returns ``(ids int64 [n], values float64 [n] | [n, Q], group_values [n, G] | None, Q)``.

        Raises:
            SampleIdError: ids not 1-D, not integers, negative, or duplicated within the step.
            ConfigurationError: shapes inconsistent with the log.
            NonFiniteError: NaN/inf values.
        """
        refuse_ids_above_int64(ids if isinstance(ids, (list, tuple)) else as_numpy(ids), f"step {step}: ids")
        ids_arr = check_ids(as_numpy(ids), what=f"step {step}: ids")
        n = ids_arr.shape[0]
        if n and np.unique(ids_arr).shape[0] != n:
            raise SampleIdError(f"step {step}: ids are duplicated within the step")
        vals = as_numpy(values).astype(np.float64, copy=False)
        if vals.ndim not in (1, 2) or vals.shape[0] != n:
            raise ConfigurationError(f"step {step}: values must be [n] or [n, Q] with n = {n} ids, got {vals.shape}")
        q = None if vals.ndim == 1 else int(vals.shape[1])
        if n_queries_fixed and q != n_queries:
            want = "[n]" if n_queries is None else f"[n, {n_queries}]"
            raise ConfigurationError(f"step {step}: values have shape {vals.shape}, log expects {want}")
        if not np.all(np.isfinite(vals)):
            raise NonFiniteError(f"step {step}: values contain NaN or inf; the training diverged?")
        if group_values is None:
            if group_names is not None:
                raise ConfigurationError(f"step {step}: the log has groups {group_names}; pass group_values")
            return ids_arr, vals, None, q
        gvals = as_numpy(group_values).astype(np.float64, copy=False)
        if group_names is None:
            raise ConfigurationError("group_values given but the writer has no group_names")
        if q is not None:
            raise ConfigurationError("group_values are only supported with 1-D values")
        if gvals.shape != (n, len(group_names)):
            raise ConfigurationError(f"step {step}: group_values must be [{n}, {len(group_names)}], got {gvals.shape}")
        if not np.all(np.isfinite(gvals)):
            raise NonFiniteError(f"step {step}: group_values contain NaN or inf")
        if n and not self.warned_groups:
            tol = 1e-4 * max(float(np.abs(vals).max()), 1e-30)
            if np.abs(gvals.sum(axis=1) - vals).max() > tol:
                warnings.warn(f"step {step}: group_values do not sum to values over groups", stacklevel=3)
                self.warned_groups = True
        return ids_arr, vals, gvals, q




def check_counts(counts: Any, n: int, step: int) -> np.ndarray:
    """``counts`` as ``[n]`` int64 occurrences (each at least 1).

    Raises:
        SampleIdError: wrong shape, not integers, or below 1.
    """
    arr = as_numpy(counts)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (n and int(arr.min()) < 1):
        raise SampleIdError(
            f"step {step}: counts must be [n] = [{n}] integers of at least 1 (occurrences of each id), "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr.astype(np.int64)


__all__ = ["StepChecker", "as_numpy", "check_counts", "check_writer_args"]
