"""Values where the data lives: a column of a Hugging Face ``datasets.Dataset``, Arrow, Parquet.

The ids a log holds are the indices the training dataset is indexed with (for the Trainer
callback: the rows of ``train_dataset``), so row ``i`` of a dataset gets the value of id ``i``.

* :func:`values_column`: one value per row (a log or a score array; document values through a
  column of document ids), NaN where the run never saw the row;
* :func:`add_values_column` / :func:`select_kept`: ``dataset.add_column`` / ``dataset.select``
  with the checks that catch a log from another dataset;
* :func:`to_arrow` / :func:`to_parquet`: the log's per-id table (``id``, ``value``, ``count``,
  ``std_value``, ``helpfulness``, and per-query / per-group columns) for pandas, Polars, DuckDB
  or Spark.

``datasets`` and ``pyarrow`` are optional (``pip install 'inrun-shapley[datasets]'``) and
imported only when used.

Example (needs the ``datasets`` extra)::

    from inrun_shapley.export import add_values_column, select_kept
    from inrun_shapley.pruning import prune
    ds = add_values_column(ds, log)                       # column "value": higher = more helpful
    ds = select_kept(ds, prune(log, fraction="auto"))     # drop the rows with negative values
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.log import ShapleyLog


def _require(module: str):
    from inrun_shapley.extras import require

    return require(module, "datasets", "this")


def values_column(values: Any, n_rows: int, *, doc_ids: Any = None, normalize: str = "step_std") -> np.ndarray:
    """``[n_rows]`` float64 helpfulness per dataset row (higher = more helpful), NaN if unseen.

    Args:
        values: a :class:`~inrun_shapley.log.ShapleyLog` (read with
            :meth:`~inrun_shapley.log.ShapleyLog.helpfulness`, mean over queries) or a 1-D array
            indexed by id (NaN = unseen), e.g. :func:`~inrun_shapley.documents.document_values`.
        n_rows: rows of the dataset.
        doc_ids: ``[n_rows]`` int: row ``i`` gets ``values[doc_ids[i]]`` (document values on a
            table of documents' rows, or on the sequences the documents were cut into); None
            means row ``i`` gets ``values[i]``.
        normalize: the log's score (see :meth:`~inrun_shapley.log.ShapleyLog.scores`).

    Raises:
        SampleIdError: the values have ids the dataset cannot have (an id ``>= n_rows`` without
            ``doc_ids``, a document id beyond the values), or ``doc_ids`` of the wrong length.
        ConfigurationError: ``values`` is not a log or a 1-D numeric array.
    """
    if isinstance(values, ShapleyLog):
        arr = np.full(values.max_id + 1, np.nan)
        q = "mean" if values.n_queries is not None else None
        arr[values.ids] = values.helpfulness(normalize, q, ids=values.ids, purpose="values_column()")
    else:
        raw = np.asarray(values)
        if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.number):
            raise ConfigurationError(
                f"values must be a ShapleyLog or a 1-D numeric array indexed by id, got shape {raw.shape} {raw.dtype}"
            )
        arr = raw.astype(np.float64)
    if doc_ids is None:
        if np.any(~np.isnan(arr[n_rows:])):
            raise SampleIdError(
                f"the values have ids up to {int(np.flatnonzero(~np.isnan(arr))[-1])} but the dataset has "
                f"{n_rows} rows: these values belong to another (larger) dataset, or pass doc_ids"
            )
        out = np.full(n_rows, np.nan)
        out[: min(n_rows, arr.size)] = arr[:n_rows]
        return out
    docs = np.asarray(doc_ids)
    if docs.shape != (n_rows,) or (docs.size and not np.issubdtype(docs.dtype, np.integer)):
        raise SampleIdError(f"doc_ids must be {n_rows} integers (one per row), got shape {docs.shape} {docs.dtype}")
    if docs.size and (docs.min() < 0 or docs.max() >= arr.size):
        raise SampleIdError(f"doc_ids must be in [0, {arr.size}) (the ids the values cover), got "
                            f"[{int(docs.min())}, {int(docs.max())}]")
    return arr[docs.astype(np.int64)]


def add_values_column(dataset: Any, values: Any, *, name: str = "value", doc_column: str | None = None,
                      normalize: str = "step_std") -> Any:
    """``dataset.add_column(name, ...)`` with one value per row (see :func:`values_column`).

    Args:
        dataset: a ``datasets.Dataset`` whose row indices are the logged ids (or whose
            ``doc_column`` holds the ids ``values`` is indexed by).
        values: a log or a score array (higher = more helpful).
        name: the new column (float64; NaN for rows never seen).
        doc_column: name of a column of document ids, for document values.

    Returns:
        The new dataset (``datasets`` returns a new object; the input is unchanged).

    Raises:
        ImportError: ``datasets`` is not installed.
        ConfigurationError: ``name`` already exists, or ``doc_column`` does not.
    """
    _require("datasets")
    if name in dataset.column_names:
        raise ConfigurationError(f"the dataset already has a column {name!r}: pass name=<another name>")
    docs = None
    if doc_column is not None:
        if doc_column not in dataset.column_names:
            raise ConfigurationError(f"doc_column {doc_column!r} is not a column of the dataset {dataset.column_names}")
        docs = np.asarray(dataset[doc_column])
    return dataset.add_column(name, values_column(values, len(dataset), doc_ids=docs, normalize=normalize).tolist())


def select_kept(dataset: Any, keep_ids: Any) -> Any:
    """``dataset.select(keep_ids)``: the pruned dataset (e.g. ``keep_ids = prune(log, ...)``).

    Raises:
        SampleIdError: an id is negative or not below ``len(dataset)``.
    """
    keep = np.asarray(keep_ids, dtype=np.int64).ravel()
    if keep.size and (keep.min() < 0 or keep.max() >= len(dataset)):
        raise SampleIdError(f"keep_ids must be row indices in [0, {len(dataset)}); got "
                            f"[{int(keep.min())}, {int(keep.max())}]: were the values computed on this dataset?")
    return dataset.select(keep.tolist())


def to_arrow(log: ShapleyLog, *, normalize: str = "step_std"):
    """The log's per-id table as a ``pyarrow.Table``: one row per seen id.

    Columns: ``id`` (int64), ``value`` (raw value sum, the log's sign and units; mean over
    queries for a per-query log), ``count`` (steps the id appeared in), ``std_value`` (sum of
    per-step standardized values), ``helpfulness`` (the ranking score under ``normalize`` times
    ``helpful_sign``: higher = more helpful; null when the sign is unknown), then ``value_q{j}``,
    ``std_value_q{j}`` per query and ``group_{name}`` per parameter group. The log's score
    description and metadata are in the schema metadata (``inrun_shapley.score``,
    ``inrun_shapley.metadata``, JSON).

    Raises:
        ImportError: ``pyarrow`` is not installed.
    """
    import json

    pa = _require("pyarrow")
    t = log.totals()
    multi = log.n_queries is not None
    cols: dict[str, Any] = {"id": t["ids"]}
    cols["value"] = t["value_sum"].mean(axis=1) if multi else t["value_sum"]
    cols["count"] = t["count"]
    cols["std_value"] = t["std_sum"].mean(axis=1) if multi else t["std_sum"]
    if log.helpful_sign is None:
        cols["helpfulness"] = pa.nulls(len(t["ids"]), pa.float64())
    else:
        cols["helpfulness"] = log.helpfulness(normalize, "mean" if multi else None, ids=log.ids)
    for j in range(log.n_queries or 0):
        cols[f"value_q{j}"] = t["value_sum"][:, j]
        cols[f"std_value_q{j}"] = t["std_sum"][:, j]
    for j, group in enumerate(log.group_names or []):
        cols[f"group_{group}"] = t["group_sum"][:, j]
    meta = {"inrun_shapley.score": json.dumps(log.score), "inrun_shapley.metadata": json.dumps(log.metadata, default=str)}
    return pa.table(cols, metadata=meta)


def to_parquet(log: ShapleyLog, path: str | os.PathLike, *, normalize: str = "step_std") -> Path:
    """Write :func:`to_arrow`'s table to a Parquet file; returns the path.

    Raises:
        ImportError: ``pyarrow`` is not installed.
    """
    pq = _require("pyarrow.parquet")
    out = Path(path)
    pq.write_table(to_arrow(log, normalize=normalize), out)
    return out


__all__ = ["add_values_column", "select_kept", "to_arrow", "to_parquet", "values_column"]
