"""Writing a value log: per-step values in, crash-safe per-id totals and per-step tables out."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inrun_shapley.errors import ConfigurationError, LogError
from inrun_shapley.log.accumulator import IdAccumulator
from inrun_shapley.log.fields import id_fields, record_dtype, stats_dtype
from inrun_shapley.log.commit import MAX_DELTAS, commit, open_log_dir, write_chunk, write_totals
from inrun_shapley.log.format import FORMAT_NAME, FORMAT_VERSION, META_FILE, library_version, now, read_table
from inrun_shapley.log.lock import WriterLock
from inrun_shapley.log.header import INRUN_POSITIVE_MEANS, INRUN_SHAPLEY, score_description
from inrun_shapley.log.moments import is_degenerate, step_moments, step_scale
from inrun_shapley.log.step_input import StepChecker, as_numpy, check_counts, check_writer_args


class ShapleyLogWriter:
    """Accumulates per-step values into per-id totals and persists them crash-safely.

    Each :meth:`flush` appends the flush's per-step tables and a *delta* of the per-id fields
    over the ids its steps touched, so its cost is proportional to what changed. The deltas are
    folded into a new base snapshot (a compaction, ``O(n_ids)``) on :meth:`close`, at the first
    flush, and whenever the listed deltas would hold more rows than the snapshot or number
    ``MAX_DELTAS``: compactions then cost ``O(1)`` amortized per changed row.

    Args:
        path: directory of the log (created if missing).
        n_queries: number of query columns Q when values are per query (``[n, Q]``); ``None``
            infers it from the first step (1-D values give a single-direction log).
        group_names: names of the G parameter groups when ``group_values`` are logged; needed
            before the first step that passes ``group_values``.
        record_steps: also append per-step ``(step, id, value)`` records (needed to recompute
            the global step standard deviation when merging per-rank logs).
        flush_every: flush automatically every this many added steps; 0 = only on
            :meth:`flush` / :meth:`close`.
        metadata: JSON-serializable user metadata stored in the header (model, seed, ...).
        resume: continue an existing log: totals are reloaded and steps up to its last flushed
            step are ignored when passed again. With ``resume=True`` and no log at ``path`` a
            new log is started.
        overwrite: replace an existing log at ``path`` with a new one. The old log is moved
            aside in one rename and then deleted, so a crash never leaves a mix of old and new
            files. Exclusive with ``resume``.
        score_kind: what the values are (header ``score.kind``): ``"inrun_shapley"`` (default),
            ``"adjoint"``, ...
        positive_means: one line saying what a positive value means; defaults to the In-Run
            Shapley meaning and is required for any other ``score_kind``.
        helpful_sign: +1 if a higher value means a more helpful sample, -1 if it means a more
            harmful one, None if unknown (pruning and ranking then refuse the log).

    Raises:
        LogError: ``path`` holds a log and neither ``resume`` nor ``overwrite`` is set; the
            resumed log is corrupt or was written with different ``n_queries`` /
            ``group_names`` / ``record_steps`` / score description.
        ConfigurationError: invalid arguments; ``resume`` and ``overwrite`` both set.

    Example:
        >>> import tempfile, numpy as np
        >>> w = ShapleyLogWriter(tempfile.mkdtemp() + "/log", flush_every=0)
        >>> w.add_step(1, np.array([0, 1]), np.array([0.5, -0.5]))
        True
        >>> w.last_step, w.flushed_step
        (1, 0)
        >>> w.close(); w.flushed_step
        1
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_queries: int | None = None,
        group_names: Sequence[str] | None = None,
        record_steps: bool = True,
        flush_every: int = 50,
        metadata: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        score_kind: str = INRUN_SHAPLEY,
        positive_means: str | None = None,
        helpful_sign: int | None = 1,
    ) -> None:
        self.group_names = check_writer_args(n_queries, flush_every, group_names, metadata)
        if resume and overwrite:
            raise ConfigurationError("pass resume=True (continue the log) or overwrite=True (replace it), not both")
        if positive_means is None and score_kind != INRUN_SHAPLEY:
            raise ConfigurationError(f"score_kind={score_kind!r} needs positive_means=<what a positive value means>")
        self.score = score_description(score_kind, positive_means or INRUN_POSITIVE_MEANS, helpful_sign)
        self.path = Path(path)
        self._n_queries = None if n_queries is None else int(n_queries)
        self._n_queries_fixed = n_queries is not None
        self.record_steps = bool(record_steps)
        self.flush_every = int(flush_every)
        self._closed = False
        self._buffer_records: list[np.ndarray] = []
        self._buffer_stats: list[np.ndarray] = []
        self._checker = StepChecker()
        self._warned_gap = False
        self._resumed_at: int | None = None
        self._totals: IdAccumulator | None = None  # everything added, flushed or not
        self._delta: IdAccumulator | None = None  # added since the last commit
        self._lock: WriterLock | None = None
        if self.path.exists() and not self.path.is_dir():
            raise LogError(f"{self.path}: exists and is a file; a value log is a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path)  # one writer per log: a second one is refused here
        try:
            header = open_log_dir(self.path, resume, overwrite)
            if overwrite and not self._lock.on_disk():  # the old log (and its lock) was moved aside
                self._lock.release()
                self._lock = WriterLock(self.path)
            self._open(header, metadata)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, header: dict[str, Any] | None, metadata: dict[str, Any] | None) -> None:
        if header is None:
            self._header: dict[str, Any] = {
                "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": library_version(),
                "created": now(), "record_steps": self.record_steps, "metadata": dict(metadata or {}),
                "score": self.score, "generation": 0, "totals": None, "deltas": [], "chunks": [],
                "last_step": 0, "n_steps": 0, "first_step": None, "degenerate_steps": 0, "std_source": None,
            }
            self._last_step = self._flushed_step = 0
        else:
            self._resume_from(header, metadata)
        if self._n_queries_fixed and self._totals is None:
            self._start_totals()

    # -- opening ---------------------------------------------------------------------------

    def _resume_from(self, header: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        log_q, log_groups, meta = header["n_queries"], header["group_names"], self.path / META_FILE
        if header["record_steps"] != self.record_steps:
            raise LogError(
                f"{meta}: log was written with record_steps={header['record_steps']}, resumed with "
                f"record_steps={self.record_steps}; pass the same value"
            )
        if self._n_queries_fixed and header["n_steps"] and log_q != self._n_queries:
            raise LogError(f"{meta}: log has n_queries={log_q}, resumed with n_queries={self._n_queries}")
        if self.group_names is not None and (log_groups is not None or header["n_steps"]) and log_groups != self.group_names:
            raise LogError(f"{meta}: log has group_names={log_groups}, resumed with {self.group_names}")
        if header["score"] != self.score:
            raise LogError(
                f"{meta}: log has score {header['score']}, resumed with {self.score}; pass the same "
                "score_kind / positive_means / helpful_sign"
            )
        if header["n_steps"]:
            self._n_queries, self._n_queries_fixed = log_q, True
        if log_groups is not None:
            self.group_names = list(log_groups)
        if metadata:
            header["metadata"].update(metadata)
        header.setdefault("resumed", []).append({"at": now(), "after_step": header["last_step"]})
        self._header = header
        self._last_step = self._flushed_step = header["last_step"]
        self._resumed_at = self._last_step if self._last_step > 0 else None
        if self._n_queries_fixed:
            self._start_totals()
            for entry in [header["totals"], *header["deltas"]]:
                if entry is not None:
                    self._totals.add_table(read_table(self.path, entry, self._fields, verify=True))

    def _start_totals(self) -> None:
        self._fields = id_fields(self._n_queries, len(self.group_names or []))
        self._totals, self._delta = IdAccumulator(self._fields), IdAccumulator(self._fields)

    # -- properties -------------------------------------------------------------------------

    @property
    def last_step(self) -> int:
        """Last step added (flushed or not); 0 before any step."""
        return self._last_step

    @property
    def flushed_step(self) -> int:
        """Last step committed to disk; a crash keeps everything up to here."""
        return self._flushed_step

    @property
    def n_queries(self) -> int | None:
        """Number of query columns Q, or None for 1-D values (None also before inference)."""
        return self._n_queries

    def totals(self) -> dict[str, np.ndarray]:
        """Current in-memory totals over seen ids (including unflushed steps).

        Returns:
            Dict with ``ids`` ``[n]`` sorted, ``value_sum`` ``[n]``/``[n, Q]``, ``count``,
            ``std_sum`` and, with groups, ``group_sum`` ``[n, G]``, aligned to ``ids``; copies.
        """
        return {"ids": np.zeros(0, np.int64)} if self._totals is None else self._totals.table()

    def state_dict(self) -> dict[str, Any]:
        """A small cursor for training checkpoints.

        Call :meth:`flush` before saving a training checkpoint so the log is never behind it;
        on restart open the same path with ``resume=True``: steps up to ``flushed_step`` that
        the resumed run replays are ignored.
        """
        return {"path": str(self.path), "format_version": FORMAT_VERSION, "last_step": self._last_step,
                "flushed_step": self._flushed_step}

    # -- adding -----------------------------------------------------------------------------

    def add_step(self, step: int, ids: Any, values: Any, group_values: Any = None, *, step_std: Any = None,
                 counts: Any = None) -> bool:
        """Add one optimizer step's values.

        Args:
            step: global optimizer step (starts at 1; strictly increasing across calls).
            ids: ``[n]`` sample ids, unique within the step, non-negative int64 (dataset
                indices, global row numbers or hashes: storage grows with distinct ids only).
            values: ``[n]`` or ``[n, Q]`` float values in the sign and units the header's score
                description declares (In-Run Shapley: validation-loss units, positive = the
                sample reduced the validation loss).
            group_values: optional ``[n, G]`` split of 1-D ``values`` over the parameter groups
                (rows sum to ``values``).
            step_std: optional standard deviation of the whole step's values (``[]`` or ``[Q]``)
                to standardize with instead of this call's own, e.g. all-reduced across DDP
                ranks; non-positive entries fall back to 1.
            counts: optional ``[n]`` positive integers: how many times each id occurred in the
                step (sampling with replacement; ``values`` then hold each id's sum over its
                occurrences); default 1 each. Added to the per-id ``count``.

        Returns:
            True when added; False when ``step`` was already committed before a resume
            (ignored, no double counting).

        Raises:
            LogError: the writer is closed.
            SampleIdError: bad ids (shape, dtype, negative, duplicated).
            ConfigurationError: shapes inconsistent with the log, or steps not increasing.
            NonFiniteError: NaN/inf values.
            OSError: an automatic flush (every ``flush_every`` steps) failed; the step itself
                was added and stays pending for the next :meth:`flush`.
        """
        if self._closed:
            raise LogError(f"{self.path}: the writer is closed; open a new one with resume=True")
        step = int(step)
        if step <= self._flushed_step:
            return False
        if step <= self._last_step:
            raise ConfigurationError(f"step {step} added after step {self._last_step}; steps must increase")
        ids_arr, vals, gvals, q = self._checker.check(
            step, ids, values, group_values, self._n_queries, self._n_queries_fixed, self.group_names
        )
        if not self._n_queries_fixed:
            self._n_queries, self._n_queries_fixed = q, True
            self._start_totals()
        cnt, mean, m2 = step_moments(vals)
        if step_std is None:
            scale, source = step_scale(cnt, m2), "local"
        else:
            given = np.broadcast_to(np.asarray(as_numpy(step_std), np.float64), mean.shape)
            scale, source = np.where(np.isfinite(given) & (given > 0), given, 1.0), "given"
        h = self._header
        h["std_source"] = source if h["std_source"] in (None, source) else "mixed"
        h["degenerate_steps"] += int(is_degenerate(cnt, m2))
        self._warn_gap(step)
        columns = {"value_sum": vals, "count": 1 if counts is None else check_counts(counts, ids_arr.shape[0], step),
                   "std_sum": vals / scale}
        if gvals is not None:
            columns["group_sum"] = gvals
        self._totals.add(ids_arr, columns)
        self._delta.add(ids_arr, columns)
        if self.record_steps:
            rec = np.zeros(ids_arr.shape[0], dtype=record_dtype(self._n_queries, len(self.group_names or [])))
            order = np.argsort(ids_arr, kind="stable")  # records sorted by (step, id)
            rec["step"], rec["id"], rec["value"] = step, ids_arr[order], vals[order]
            if gvals is not None:
                rec["group_value"] = gvals[order]
            self._buffer_records.append(rec)
        st = np.zeros(1, dtype=stats_dtype(self._n_queries))
        st["step"], st["n"], st["mean"], st["m2"], st["scale"] = step, cnt, mean, m2, scale
        self._buffer_stats.append(st)
        h["n_steps"] += 1
        h["first_step"] = step if h["first_step"] is None else h["first_step"]
        self._last_step = step
        if self.flush_every and len(self._buffer_stats) >= self.flush_every:
            self.flush()
        return True

    def _warn_gap(self, step: int) -> None:
        if self._resumed_at is not None and not self._warned_gap:
            if step > self._resumed_at + 1:
                warnings.warn(
                    f"{self.path}: resumed log ends at step {self._resumed_at} but the next step added is "
                    f"{step}; the steps in between are missing from the log",
                    stacklevel=3,
                )
            self._warned_gap = True

    # -- persisting -------------------------------------------------------------------------

    def flush(self, *, compact: bool = False) -> None:
        """Commit everything added so far to disk (atomic; no-op when nothing is pending).

        Args:
            compact: also fold the listed deltas into a new base snapshot (``O(n_ids)``).

        Raises:
            OSError: the disk write failed; the log on disk is left as of the previous flush and
                the pending steps stay in memory for a retry.
        """
        old = self._header
        pending = bool(self._buffer_stats)
        if not pending and old["generation"] > 0 and not (compact and old["deltas"]):
            return
        root, gen = self.path, old["generation"] + 1
        root.mkdir(parents=True, exist_ok=True)
        header = dict(old, chunks=list(old["chunks"]), deltas=list(old["deltas"]))
        if pending:
            records = np.concatenate(self._buffer_records) if self.record_steps else None
            header["chunks"].append(write_chunk(root, gen, np.concatenate(self._buffer_stats), records))
        if self._totals is not None and (pending or compact):
            write_totals(root, header, gen, self._totals, self._delta, compact)
        header.update(
            generation=gen, updated=now(), format_version=FORMAT_VERSION, n_queries=self._n_queries,
            group_names=self.group_names, last_step=self._last_step,
            n_ids=len(self._totals) if self._totals is not None else 0,
            max_id=self._totals.max_id if self._totals is not None else -1,
        )
        commit(root, old, header)
        self._header = header
        self._flushed_step = self._last_step
        self._buffer_records, self._buffer_stats = [], []
        if self._totals is not None:
            self._delta = IdAccumulator(self._fields)

    def close(self) -> None:
        """Flush, fold the deltas into one base snapshot, and close; further :meth:`add_step`
        calls raise :class:`LogError`."""
        if not self._closed:
            self.flush(compact=True)  # on failure: still open (and locked) for a retry
            self._closed = True
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> "ShapleyLogWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep what was computed before the error, never mask the error itself
            self.close()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        return (
            f"ShapleyLogWriter({str(self.path)!r}, last_step={self._last_step}, "
            f"flushed_step={self._flushed_step}, n_queries={self._n_queries})"
        )


__all__ = ["MAX_DELTAS", "ShapleyLogWriter"]
