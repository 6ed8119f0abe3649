"""Reading a value log back: totals per id, scores for ranking, export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inrun_shapley.errors import ConfigurationError, LogError
from inrun_shapley.log.accumulator import IdAccumulator, check_ids
from inrun_shapley.log.fields import id_fields, record_dtype, stats_dtype
from inrun_shapley.log.commit import commit, write_chunk, write_table
from inrun_shapley.log.format import FORMAT_NAME, FORMAT_VERSION, META_FILE, now, read_chunks, read_table
from inrun_shapley.log.header import read_header, read_snapshot
from inrun_shapley.log.moments import RECORD_NORMALIZATIONS, normalized_record_sums

NORMALIZATIONS = ("none", "step_std", "mean", "loss_change", "step_z")  # the last two need record_steps
# how each normalization reads in printed rankings
RANKINGS = {
    "none": "raw value sum",
    "step_std": "per-step standardized score",
    "mean": "mean value per appearance",
    "loss_change": "sum of shares of each step's validation-loss change",
    "step_z": "per-step z-scored score",
}


class Ranked(tuple):
    """``(ids, scores)`` as returned by :meth:`ShapleyLog.top`, unpacking like a pair, with
    ``ranking``: one line saying which score ranked them (see :meth:`ShapleyLog.ranking`)."""

    ranking: str

    def __new__(cls, ids: np.ndarray, scores: np.ndarray, ranking: str) -> "Ranked":
        out = super().__new__(cls, (ids, scores))
        out.ranking = ranking
        return out

    @property
    def ids(self) -> np.ndarray:
        return self[0]

    @property
    def scores(self) -> np.ndarray:
        return self[1]


class ShapleyLog:
    """A value log read back into memory.

    Totals are stored per *seen* id (sorted ``ids`` and rows aligned to them), so a log whose
    ids are hashes or global row numbers costs memory per seen id only. The dense arrays
    ``values``, ``counts``, ``std_values``, ``group_values`` and ``seen`` are indexed by id
    (length ``max_id + 1``, 0 for ids never seen) and are built on first access; for a sparse
    id space (largest id above ``max(2**24, 4 · n_seen)``) they are refused with a
    :class:`~inrun_shapley.errors.SampleIdError`: use :meth:`totals` or
    ``scores(..., ids=...)`` there.

    What the numbers mean is in ``score`` (the header's score description): ``kind``,
    ``positive_means`` and ``helpful_sign`` (+1: higher = more helpful, -1: higher = more
    harmful, None: unknown). For In-Run Shapley logs a value is positive when the sample's
    presence reduced the validation loss, in units of validation loss.

    Attributes:
        ids: ``[n_seen]`` int64 sorted ids that appeared at least once.
        group_names: the G group names, or None.
        steps: per-step records as a structured array (``step``, ``id``, ``value``
            [, ``group_value``]) sorted by step then id, or None when not recorded.
        step_stats: per-step statistics (``step``, ``n``, ``mean``, ``m2``, ``scale``).
        metadata: the user metadata dict given to the writer.
        score: the score description (see above).
        header: the full validated ``meta.json``.
        n_queries: Q, or None for a single validation direction.
        last_step: last committed optimizer step (0 for an empty log).
        path: where it was read from (None when built in memory).
    """

    def __init__(
        self, *, totals: IdAccumulator, group_names: list[str] | None, steps: np.ndarray | None,
        step_stats: np.ndarray, header: dict[str, Any], path: Path | None = None,
    ) -> None:
        self._totals = totals
        self._dense: dict[str, np.ndarray] = {}
        self.group_names = group_names
        self.steps = steps
        self.step_stats = step_stats
        self.header = header
        self.path = path
        self.ids = totals.ids()
        self.n_queries: int | None = header.get("n_queries")
        self.last_step = int(header.get("last_step", 0))
        self.metadata: dict[str, Any] = dict(header.get("metadata") or {})
        self.score: dict[str, Any] = dict(header["score"])

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True, progress: bool = False) -> "ShapleyLog":
        """Read a log directory.

        A directory with no ``meta.json`` whose subdirectories ``rank*`` are logs is read as
        the per-rank logs of one DDP run and merged in memory (see :meth:`merge`).

        Args:
            path: the log directory.
            verify: check every file's CRC-32 against the header.
            progress: show a tqdm bar while reading many chunks.

        A writer may be flushing or compacting the same log meanwhile: the log is read as of one
        committed ``meta.json``, and when a commit removes files that header listed the read
        starts again from the new header (:func:`~inrun_shapley.log.header.read_snapshot`), so every
        load is one consistent snapshot.

        Raises:
            LogError: missing path, missing or corrupt ``meta.json`` (any field missing or of
                the wrong type), a listed file missing, a symbolic link or outside the
                directory, truncated, corrupt or inconsistent with the header.
        """
        root = Path(path)
        if root.is_dir() and not (root / META_FILE).exists() and not (root / META_FILE).is_symlink():
            ranks = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("rank"))
            if ranks:
                return cls.merge(ranks, verify=verify, progress=progress)
        return read_snapshot(root, lambda header: cls._read_snapshot(root, header, verify, progress))

    @classmethod
    def _read_snapshot(cls, root: Path, header: dict[str, Any], verify: bool, progress: bool) -> "ShapleyLog":
        q, groups = header["n_queries"], header["group_names"]
        n_groups = len(groups) if groups else 0
        fields = id_fields(q, n_groups)
        totals = IdAccumulator(fields)
        for entry in [header["totals"], *header["deltas"]]:
            if entry is not None:
                totals.add_table(read_table(root, entry, fields, verify))
        chunks = header["chunks"]
        stats = read_chunks(root, [c["stats"] for c in chunks], stats_dtype(q), "stats", verify, progress)
        steps = None
        if header["record_steps"]:
            steps = read_chunks(root, [c["steps"] for c in chunks], record_dtype(q, n_groups), "steps", verify, progress)
        return cls(totals=totals, group_names=list(groups) if groups else None, steps=steps, step_stats=stats,
                   header=header, path=root)

    @classmethod
    def merge(cls, paths: Sequence[Any], out_path: str | os.PathLike | None = None, *, verify: bool = True,
              progress: bool = False) -> "ShapleyLog":
        """Combine the per-rank logs of one distributed run; see :func:`inrun_shapley.log.merge_logs`."""
        from inrun_shapley.log.merge import merge_logs

        return merge_logs(paths, out_path, verify=verify, progress=progress)

    # -- per-id totals ------------------------------------------------------------------------

    def totals(self) -> dict[str, np.ndarray]:
        """Sparse totals: ``ids`` ``[n_seen]`` sorted, and aligned to them ``value_sum``
        (``[n_seen]`` or ``[n_seen, Q]``), ``count``, ``std_sum`` and with groups ``group_sum``
        ``[n_seen, G]``; copies. Works for any id space."""
        return self._totals.table()

    def _dense_field(self, name: str) -> np.ndarray:
        if name not in self._dense:
            self._dense[name] = self._totals.dense(name)
        return self._dense[name]

    @property
    def values(self) -> np.ndarray:
        """``[max_id + 1]`` (or ``[max_id + 1, Q]``) float64 sum over steps of the value."""
        return self._dense_field("value_sum")

    @property
    def counts(self) -> np.ndarray:
        """``[max_id + 1]`` int64 occurrences of each id (steps it appeared in, each repeat of a
        sampling with replacement counted)."""
        return self._dense_field("count")

    @property
    def std_values(self) -> np.ndarray:
        """Like :attr:`values`, the sum of per-step standardized values (unitless)."""
        return self._dense_field("std_sum")

    @property
    def group_values(self) -> np.ndarray | None:
        """``[max_id + 1, G]`` per-group split of :attr:`values`, or None."""
        return self._dense_field("group_sum") if self.group_names else None

    @property
    def seen(self) -> np.ndarray:
        """``[max_id + 1]`` bool, ``counts > 0``."""
        return self.counts > 0

    @property
    def max_id(self) -> int:
        """Largest id seen, -1 for an empty log."""
        return int(self.ids[-1]) if self.ids.size else -1

    # -- scores -----------------------------------------------------------------------------

    def scores(self, normalize: str = "step_std", query: int | str | None = None, *, ids: Any = None) -> np.ndarray:
        """Per-id scores, in the sign the header's ``score`` declares.

        ``"step_std"`` (the default) is the sum of per-step standardized values: raw sums are
        dominated by the first epoch because early steps have much larger values (docs/math.md
        §1.4; label-noise AUC 0.94 vs 0.89 for raw sums). To rank by helpfulness whatever the
        sign convention, use :meth:`helpfulness`.

        Args:
            normalize: ``"none"`` (raw sum, the log's units), ``"step_std"`` (sum of per-step
                standardized values, unitless), ``"mean"`` (raw sum / count), or, from the
                per-step records (logs written with ``record_steps=True``),
                ``"loss_change"`` (each step's values divided by the magnitude of the step's
                summed value, per query column) or ``"step_z"`` (per-step z-scores: the step's
                mean subtracted, divided by its std); see :mod:`inrun_shapley.log.moments`.
            query: for per-query logs: None = all columns ``[.., Q]``, an int = that column,
                ``"mean"`` = mean over queries. Must be None (or "mean") for 1-D logs.
            ids: None for a dense array indexed by id (refused for sparse id spaces), or the
                ids to score (e.g. ``log.ids``): the result is aligned to them, 0 where unseen.

        Returns:
            ``[max_id + 1]`` or ``[len(ids)]`` (``[.., Q]`` for all query columns) float64.

        Raises:
            ConfigurationError: unknown normalization or bad query.
            SampleIdError: dense scores of a sparse id space, or bad ``ids``.
        """
        if normalize not in NORMALIZATIONS:
            raise ConfigurationError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if ids is None:
            field = lambda name: self._dense_field(name)  # noqa: E731
        else:
            at = check_ids(np.asarray(ids))
            field = lambda name: self._totals.lookup(name, at)  # noqa: E731
        if normalize in RECORD_NORMALIZATIONS and normalize != "step_std":
            base = self._record_scores(normalize, ids)
        elif normalize == "none":
            base = field("value_sum")
        elif normalize == "step_std":
            base = field("std_sum")
        else:
            values = field("value_sum")
            denom = np.maximum(field("count"), 1).astype(np.float64)
            base = values / (denom if values.ndim == 1 else denom[:, None])
        return _select_query(base, self.n_queries, query).copy()

    def _record_scores(self, normalize: str, ids: Any) -> np.ndarray:
        """Scores computed from the per-step records (dense, or aligned to ``ids``; 0 where unseen)."""
        if self.steps is None:
            raise ConfigurationError(
                f"normalize={normalize!r} is computed from the per-step records, and this log has none: "
                "write it with record_steps=True, or use 'none', 'step_std' or 'mean'"
            )
        seen, sums = normalized_record_sums(self.steps, self.step_stats, normalize)
        at = np.arange(self.max_id + 1) if ids is None else check_ids(np.asarray(ids))
        if ids is None:
            self._dense_field("count")  # refuses a sparse id space like the other dense scores
        out = np.zeros((at.shape[0],) + sums.shape[1:], dtype=np.float64)
        pos = np.searchsorted(seen, at)
        hit = pos < seen.shape[0]
        hit[hit] = seen[pos[hit]] == at[hit]
        out[hit] = sums[pos[hit]]
        return out

    @property
    def helpful_sign(self) -> int | None:
        """+1 (higher = more helpful), -1 (higher = more harmful) or None (unknown)."""
        return self.score["helpful_sign"]

    def helpfulness(self, normalize: str = "step_std", query: int | str | None = None, *, ids: Any = None,
                    purpose: str = "ranking") -> np.ndarray:
        """:meth:`scores` times ``helpful_sign``: higher = more helpful, whatever the log's sign.

        Raises:
            LogError: the log's ``helpful_sign`` is null (unknown direction).
        """
        sign = self.helpful_sign
        if sign is None:
            raise LogError(
                f"{self.path or 'log'}: {purpose} needs to know whether a higher score is more helpful, but "
                f"this log's score ({self.score['kind']}: positive = {self.score['positive_means']}) has "
                "helpful_sign null. Rewrite the log with ShapleyLogWriter(..., helpful_sign=1 or -1) "
                "(e.g. adjoint_influence with a loss output gives -1), or rank log.scores() yourself"
            )
        return sign * self.scores(normalize, query, ids=ids)

    def ranking(self, normalize: str = "step_std", query: int | str | None = None) -> str:
        """One line naming a ranking: the score, the query column and the sign applied.

        The default (``normalize="step_std"``, mean over the queries of a per-query log, times
        ``helpful_sign``) is the one ranking :meth:`top`, :func:`inrun_shapley.prune` and
        ``inrun-shapley report`` / ``prune`` use unless told otherwise.

        Example: ``"per-step standardized score (step_std), mean over queries, times helpful_sign +1"``.
        """
        if normalize not in NORMALIZATIONS:
            raise ConfigurationError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        parts = [f"{RANKINGS.get(normalize, normalize)} ({normalize})"]
        if self.n_queries is not None:
            parts.append("mean over queries" if query in (None, "mean") else f"query {query}")
        sign = self.helpful_sign
        parts.append("helpful_sign unknown" if sign is None else f"times helpful_sign {sign:+d}")
        return ", ".join(parts)

    def top(self, query: int | str | None = None, k: int = 10, *, normalize: str = "step_std",
            largest: bool = True) -> Ranked:
        """The k most helpful (or most harmful) seen ids for one query.

        Ranked like :func:`inrun_shapley.prune` and ``inrun-shapley report`` by default: by the
        per-step standardized score (docs/math.md §1.4) times the header's ``helpful_sign``, so
        for a log with sign -1 the most helpful ids are those with the smallest scores.

        Args:
            query: column of a per-query log (int or ``"mean"``, required there); None for 1-D
                logs.
            k: how many.
            normalize: see :meth:`scores`; ``"none"`` ranks by raw value sums.
            largest: True gives the k most helpful, False the k most harmful.

        Returns:
            ``(ids, scores)``, each ``[min(k, n_seen)]``, scores under ``normalize`` as logged
            (the log's sign), most helpful (or most harmful) first; ties by ascending id. The
            pair also carries ``.ranking``, the line :meth:`ranking` gives.

        Raises:
            ConfigurationError: bad ``query``, ``k`` or ``normalize``.
            LogError: the log's ``helpful_sign`` is null.
        """
        if self.n_queries is not None and query is None:
            raise ConfigurationError("top() on a per-query log needs query=<column> or 'mean'")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ConfigurationError(f"k must be an int >= 0, got {k!r}")
        helpful = self.helpfulness(normalize, query, ids=self.ids, purpose="top()")
        order = np.lexsort((self.ids, -helpful if largest else helpful))[:k]
        return Ranked(self.ids[order].copy(), self.helpful_sign * helpful[order], self.ranking(normalize, query))

    # -- export -----------------------------------------------------------------------------

    def to_pandas(self):
        """One row per seen id: ``id``, ``value``, ``count``, ``std_value``, and extra columns.

        Per-query logs: ``value`` / ``std_value`` are means over queries and ``value_q{j}`` /
        ``std_value_q{j}`` hold each column; grouped logs add ``group_{name}`` columns.

        Raises:
            ImportError: pandas is not installed (``pip install inrun-shapley[pandas]``).
        """
        from inrun_shapley.extras import require

        pd = require("pandas", "pandas", "ShapleyLog.to_pandas")
        t = self.totals()
        cols: dict[str, np.ndarray] = {"id": t["ids"]}
        if self.n_queries is None:
            cols.update(value=t["value_sum"], count=t["count"], std_value=t["std_sum"])
        else:
            cols.update(value=t["value_sum"].mean(axis=1), count=t["count"], std_value=t["std_sum"].mean(axis=1))
            cols.update({f"value_q{j}": t["value_sum"][:, j] for j in range(self.n_queries)})
            cols.update({f"std_value_q{j}": t["std_sum"][:, j] for j in range(self.n_queries)})
        for j, name in enumerate(self.group_names or []):
            cols[f"group_{name}"] = t["group_sum"][:, j]
        return pd.DataFrame(cols)

    def step_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Per step, the sum of the step's values (the linear part of its validation-loss drop).

        Returns:
            ``(steps [T], totals [T] or [T, Q])`` from the per-step stats (``n · mean``).
        """
        st = self.step_stats
        n = st["n"].astype(np.float64)
        return st["step"].copy(), st["mean"] * (n if st["mean"].ndim == 1 else n[:, None])

    def save(self, path: str | os.PathLike) -> Path:
        """Write this log as a new log directory (one base snapshot, one chunk); returns the path.

        Raises:
            LogError: ``path`` already holds a log or other files.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LogError(f"{root}: exists and is not an empty directory; pick a new path")
        root.mkdir(parents=True, exist_ok=True)
        header = {k: v for k, v in self.header.items() if k != "resumed"}
        header.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, generation=1, updated=now(),
                      n_ids=int(self.ids.shape[0]), max_id=self.max_id, record_steps=self.steps is not None,
                      deltas=[], chunks=[])
        header["totals"] = write_table(root / "totals-000001.npz", self._totals)
        if self.step_stats.shape[0]:
            header["chunks"].append(write_chunk(root, 1, self.step_stats, self.steps))
        commit(root, None, header)
        return root

    def __repr__(self) -> str:
        return (
            f"ShapleyLog(path={str(self.path)!r}, n_seen={self.ids.shape[0]}, last_step={self.last_step}, "
            f"n_queries={self.n_queries}, groups={self.group_names}, score={self.score['kind']!r})"
        )


def _select_query(base: np.ndarray, n_queries: int | None, query: int | str | None) -> np.ndarray:
    if n_queries is None:
        if query not in (None, "mean", 0):
            raise ConfigurationError(f"this log has a single value per sample; query={query!r} is invalid")
        return base
    if query is None:
        return base
    if query == "mean":
        return base.mean(axis=1)
    if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or not 0 <= query < n_queries:
        raise ConfigurationError(f"query must be 'mean' or an int in [0, {n_queries}), got {query!r}")
    return base[:, int(query)]


__all__ = ["NORMALIZATIONS", "RANKINGS", "Ranked", "ShapleyLog"]
