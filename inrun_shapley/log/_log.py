"""The on-disk value log: per-sample In-Run Shapley totals and per-step records.

The step engine hands the log, once per optimizer step, the ids of the step's samples and
their values; :class:`ShapleyLogWriter` keeps running totals per sample id and persists them;
:class:`ShapleyLog` reads a log back (no training code needed), normalizes scores for ranking,
and merges the per-rank logs of a distributed run.

Sign and units: a value is positive when the sample's presence in the step *reduced* the
validation loss; values include the learning rate, so they are in units of validation loss
(DESIGN.md §2, "Sign and scale").

Fields kept per sample id, one reduction each (STYLE.md, point 6):

=================  ==========================================================  ============
field              meaning                                                     reduction
=================  ==========================================================  ============
``value_sum``      sum over steps of the value (``[Q]`` per query)             sum
``count``          number of steps the id appeared in                          sum
``std_sum``        sum over steps of value / (that step's std), per query      sum
``group_sum``      ``value_sum`` split over the G parameter groups             sum
per-step records   ``(step, id, value[, group_value])`` rows                   concat
per-step stats     ``(step, n, mean, m2, scale)`` per step (always kept)       concat
=================  ==========================================================  ============

**Per-step standardization.** Early steps have much larger values than late ones (the loss
falls fast), so raw run totals are dominated by the first epoch. ``std_sum`` divides each step's
values by their *scale*: the population standard deviation (``ddof=0``) of that step's values
over all the step's samples, computed per query column. The mean is *not* subtracted, so signs
are kept. When a step has fewer than two samples, or its standard deviation is zero or not
finite, its scale is 1: the raw value is added. This keeps batch-size-1 runs meaningful (every
step raw) and makes a rare degenerate step (e.g. a final batch of one sample) negligible next to
standardized values of order 1; the header counts such steps in ``degenerate_steps``.
Under DDP a rank only sees its own samples: pass the all-reduced standard deviation as
``add_step(..., step_std=...)`` or let :meth:`ShapleyLog.merge` recompute the global scale
from the per-step records (see there).

On-disk format (``format_version`` 1): a directory holding

* ``meta.json``: the header and the commit point. It lists every data file of the log with its
  byte size and CRC-32; files it does not list do not exist as far as readers are concerned.
* ``totals-GGGGGG.npz``: uncompressed ``np.savez`` of the totals over *seen ids only*
  (``ids`` int64 ``[n]`` sorted, ``value_sum`` ``[n]`` or ``[n, Q]``, ``count`` int64 ``[n]``,
  ``std_sum`` like ``value_sum``, ``group_sum`` ``[n, G]`` when groups are logged). Rewritten
  under a new generation number ``G`` at every flush; the previous one is removed after commit.
* ``steps-CCCCCC.npy``: one structured array of per-step records per flush (fields ``step``,
  ``id``, ``value`` (shape ``()`` or ``(Q,)``), ``group_value`` ``(G,)`` when groups), only when
  steps are recorded. Appended, never rewritten.
* ``stats-CCCCCC.npy``: per-step statistics of the same flush (fields ``step``, ``n``, ``mean``,
  ``m2`` (sum of squared deviations), ``scale`` (the divisor used)), always written: they let a
  merge recompute the global per-step standard deviation exactly (Chan's parallel formula).

Why numpy files plus a JSON header: no new dependency (pyarrow is not installed, and HDF5 would
need h5py and offers no crash atomicity); everything is readable with ``json`` and ``np.load``
alone (``.npy`` chunks can be memory-mapped with ``mmap_mode="r"``); per-flush chunk files make
long runs append-only; and every file is written to a temporary name, fsynced, then moved into
place with ``os.replace``, with ``meta.json`` written last, so a crash at any moment leaves the
log exactly as of its last complete flush (stray files from an interrupted flush are ignored by
readers and removed on resume).

Example:
    >>> import tempfile, os, numpy as np
    >>> d = os.path.join(tempfile.mkdtemp(), "run.shapley")
    >>> with ShapleyLogWriter(d) as w:
    ...     w.add_step(1, np.array([3, 5]), np.array([0.2, -0.1]))
    ...     w.add_step(2, np.array([5, 0]), np.array([0.05, 0.01]))
    True
    True
    >>> log = ShapleyLog.load(d)
    >>> log.values.round(3).tolist(), log.counts.tolist(), log.ids.tolist()
    ([0.01, 0.0, 0.0, 0.2, 0.0, -0.05], [1, 0, 0, 1, 0, 2], [0, 3, 5])
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from inrun_shapley.atomic import atomic_write, npy_bytes, npz_bytes
from inrun_shapley.errors import ConfigurationError, LogError, NonFiniteError, SampleIdError

FORMAT_NAME = "inrun-shapley-log"
FORMAT_VERSION = 1
META_FILE = "meta.json"
NORMALIZATIONS = ("none", "step_std", "mean")
MAX_SAMPLE_ID = 2**32  # ids index a dataset; totals are dense arrays indexed by id

_DATA_FILE = re.compile(r"^(totals-\d{6}\.npz|steps-\d{6}\.npy|stats-\d{6}\.npy)$")
_TMP_FILE = re.compile(r"^\..*\.tmp$")


# --------------------------------------------------------------------------------------------
# Pure per-step functions (shared with the merge and with post-hoc modules)
# --------------------------------------------------------------------------------------------


def step_moments(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations of one step's values, per query column.

    Args:
        values: ``[n]`` or ``[n, Q]`` float64 values of one step's samples.

    Returns:
        ``(n, mean, m2)`` with ``mean`` and ``m2`` of shape ``values.shape[1:]``; zeros when
        ``n == 0``.
    """
    n = int(values.shape[0])
    if n == 0:
        zero = np.zeros(values.shape[1:], dtype=np.float64)
        return 0, zero, zero.copy()
    mean = values.mean(axis=0)
    m2 = ((values - mean) ** 2).sum(axis=0)
    return n, np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)


def combine_moments(
    n: np.ndarray, mean: np.ndarray, m2: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine per-part moments into those of the union (Chan et al.'s parallel formula).

    Args:
        n: ``[R]`` sample counts of the parts.
        mean: ``[R]`` or ``[R, Q]`` part means.
        m2: like ``mean``, part sums of squared deviations.

    Returns:
        ``(n_total, mean_total, m2_total)``, numerically stable (no ``E[x²] − E[x]²``).
    """
    n = np.asarray(n, dtype=np.float64)
    total = float(n.sum())
    if total == 0:
        return 0, np.zeros(mean.shape[1:]), np.zeros(mean.shape[1:])
    w = n.reshape((-1,) + (1,) * (mean.ndim - 1))
    grand = (w * mean).sum(axis=0) / total
    m2_total = m2.sum(axis=0) + (w * (mean - grand) ** 2).sum(axis=0)
    return int(total), grand, m2_total


def step_scale(n: int, m2: np.ndarray) -> np.ndarray:
    """The divisor of per-step standardization: population std, or 1 where degenerate.

    Args:
        n: number of samples in the step (over all ranks).
        m2: ``[]`` or ``[Q]`` sum of squared deviations of the step's values.

    Returns:
        ``sqrt(m2 / n)`` per query column, replaced by 1 where ``n < 2`` or the std is 0 or
        not finite.
    """
    m2 = np.asarray(m2, dtype=np.float64)
    if n < 2:
        return np.ones_like(m2)
    std = np.sqrt(np.maximum(m2, 0.0) / n)
    return np.where(np.isfinite(std) & (std > 0), std, 1.0)


# --------------------------------------------------------------------------------------------
# Low-level file helpers
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)








def _read_checked(root: Path, entry: dict[str, Any], verify: bool) -> bytes:
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not _DATA_FILE.match(name):
        raise LogError(f"{root / META_FILE}: bad file entry {entry!r}; the header is corrupt")
    path = root / name
    if not path.is_file():
        raise LogError(f"{path}: file listed in {META_FILE} is missing; the log is incomplete")
    data = path.read_bytes()
    if len(data) != entry.get("bytes"):
        raise LogError(
            f"{path}: truncated or overwritten: {len(data)} bytes on disk, "
            f"{entry.get('bytes')} recorded in {META_FILE}"
        )
    if verify and (zlib.crc32(data) & 0xFFFFFFFF) != entry.get("crc32"):
        raise LogError(f"{path}: checksum mismatch; the file is corrupt")
    return data


def _record_dtype(n_queries: int | None, n_groups: int) -> np.dtype:
    value = ("value", np.float64) if n_queries is None else ("value", np.float64, (n_queries,))
    fields: list[tuple] = [("step", np.int64), ("id", np.int64), value]
    if n_groups:
        fields.append(("group_value", np.float64, (n_groups,)))
    return np.dtype(fields)


def _stats_dtype(n_queries: int | None) -> np.dtype:
    shape = () if n_queries is None else (n_queries,)
    return np.dtype(
        [
            ("step", np.int64),
            ("n", np.int64),
            ("mean", np.float64, shape),
            ("m2", np.float64, shape),
            ("scale", np.float64, shape),
        ]
    )


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _library_version() -> str:
    try:
        from inrun_shapley._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def _read_header(root: Path) -> dict[str, Any]:
    meta = root / META_FILE
    if not root.exists():
        raise LogError(f"{root}: no such value log")
    if not root.is_dir():
        raise LogError(f"{root}: a value log is a directory, found a file")
    if not meta.is_file():
        raise LogError(f"{meta}: missing; {root} is not a value log (or nothing was ever flushed)")
    try:
        header = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LogError(f"{meta}: unreadable header ({exc}); the log is corrupt") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise LogError(f"{meta}: not an inrun-shapley log header (format field missing or wrong)")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LogError(
            f"{meta}: format_version {version!r} is not supported (this library reads up to "
            f"{FORMAT_VERSION}); upgrade inrun-shapley"
        )
    for key in ("last_step", "generation", "chunks", "totals"):
        if key not in header:
            raise LogError(f"{meta}: header lacks {key!r}; the log is corrupt")
    return header


# --------------------------------------------------------------------------------------------
# Dense totals
# --------------------------------------------------------------------------------------------


class _Totals:
    """Dense per-id running totals (index = sample id), grown by doubling."""

    def __init__(self, n_queries: int | None, n_groups: int) -> None:
        self.n_queries = n_queries
        self.n_groups = n_groups
        self.size = 0  # max_id + 1
        self._alloc(0)

    def _shape(self, cap: int) -> tuple[int, ...]:
        return (cap,) if self.n_queries is None else (cap, self.n_queries)

    def _alloc(self, cap: int) -> None:
        self.value_sum = np.zeros(self._shape(cap))
        self.std_sum = np.zeros(self._shape(cap))
        self.count = np.zeros(cap, dtype=np.int64)
        self.group_sum = np.zeros((cap, self.n_groups)) if self.n_groups else None

    def grow(self, size: int) -> None:
        if size <= self.size:
            return
        cap = self.count.shape[0]
        if size > cap:
            new_cap = max(size, 2 * cap, 1024)
            old = (self.value_sum, self.std_sum, self.count, self.group_sum)
            self._alloc(new_cap)
            self.value_sum[:cap] = old[0]
            self.std_sum[:cap] = old[1]
            self.count[:cap] = old[2]
            if self.group_sum is not None:
                self.group_sum[:cap] = old[3]
        self.size = size

    def seen_ids(self) -> np.ndarray:
        return np.flatnonzero(self.count[: self.size] > 0).astype(np.int64)

    def sparse(self) -> dict[str, np.ndarray]:
        ids = self.seen_ids()
        out = {
            "ids": ids,
            "value_sum": self.value_sum[ids],
            "count": self.count[ids],
            "std_sum": self.std_sum[ids],
        }
        if self.group_sum is not None:
            out["group_sum"] = self.group_sum[ids]
        return out

    def load_sparse(self, arrays: dict[str, np.ndarray]) -> None:
        ids = arrays["ids"]
        self.grow(int(ids.max()) + 1 if ids.size else 0)
        self.value_sum[ids] = arrays["value_sum"]
        self.std_sum[ids] = arrays["std_sum"]
        self.count[ids] = arrays["count"]
        if self.group_sum is not None:
            self.group_sum[ids] = arrays["group_sum"]


def _read_totals(
    root: Path, header: dict[str, Any], n_queries: int | None, n_groups: int, verify: bool
) -> dict[str, np.ndarray]:
    entry = header["totals"]
    vshape = () if n_queries is None else (n_queries,)
    if entry is None:
        empty = {
            "ids": np.zeros(0, np.int64),
            "value_sum": np.zeros((0,) + vshape),
            "count": np.zeros(0, np.int64),
            "std_sum": np.zeros((0,) + vshape),
        }
        if n_groups:
            empty["group_sum"] = np.zeros((0, n_groups))
        return empty
    data = _read_checked(root, entry, verify)
    path = root / entry["file"]
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise LogError(f"{path}: unreadable totals file ({exc})") from exc
    need = ["ids", "value_sum", "count", "std_sum"] + (["group_sum"] if n_groups else [])
    missing = [k for k in need if k not in arrays]
    if missing:
        raise LogError(f"{path}: totals file lacks arrays {missing}")
    n = arrays["ids"].shape[0]
    expected = {
        "ids": (n,),
        "value_sum": (n,) + vshape,
        "count": (n,),
        "std_sum": (n,) + vshape,
        "group_sum": (n, n_groups),
    }
    for k in need:
        if arrays[k].shape != expected[k]:
            raise LogError(
                f"{path}: array {k!r} has shape {arrays[k].shape}, expected {expected[k]} "
                f"(n_queries={n_queries}, groups={n_groups}); the file does not match the header"
            )
    ids = arrays["ids"]
    if n and (ids.min() < 0 or np.any(np.diff(ids) <= 0)):
        raise LogError(f"{path}: ids are not sorted, unique and non-negative; corrupt totals")
    return arrays


def _read_chunks(
    root: Path,
    entries: Sequence[dict[str, Any]],
    dtype: np.dtype,
    what: str,
    verify: bool,
    progress: bool,
) -> np.ndarray:
    parts = []
    iterator: Iterable = entries
    if progress and len(entries) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(entries, desc=f"reading {what}", unit="chunk", disable=None)
    for entry in iterator:
        data = _read_checked(root, entry, verify)
        path = root / entry["file"]
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise LogError(f"{path}: unreadable {what} chunk ({exc})") from exc
        if arr.dtype != dtype:
            raise LogError(f"{path}: {what} chunk has dtype {arr.dtype}, expected {dtype}")
        if arr.ndim != 1 or arr.shape[0] != entry.get("rows"):
            raise LogError(
                f"{path}: {what} chunk has {arr.shape} rows, {entry.get('rows')} recorded in "
                f"{META_FILE}"
            )
        parts.append(arr)
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)


def _clean_strays(root: Path, header: dict[str, Any] | None) -> None:
    """Remove temp files and data files that the committed header does not list."""
    listed = set()
    if header is not None:
        if header.get("totals"):
            listed.add(header["totals"]["file"])
        for entry in header.get("chunks", []):
            for kind in ("steps", "stats"):
                if isinstance(entry, dict) and isinstance(entry.get(kind), dict):
                    listed.add(entry[kind].get("file"))
    for child in root.iterdir():
        name = child.name
        if child.is_file() and (
            _TMP_FILE.match(name) or (_DATA_FILE.match(name) and name not in listed)
        ):
            try:
                child.unlink()
            except OSError:  # pragma: no cover
                pass


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class ShapleyLogWriter:
    """Accumulates per-step values into per-id totals and persists them crash-safely.

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

    Raises:
        LogError: ``path`` holds a log and ``resume`` is False; the existing log is corrupt or
            was written with different ``n_queries`` / ``group_names`` / ``record_steps``.
        ConfigurationError: invalid arguments.

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
    ) -> None:
        if n_queries is not None and (
            isinstance(n_queries, bool)
            or not isinstance(n_queries, (int, np.integer))
            or n_queries < 1
        ):
            raise ConfigurationError(f"n_queries must be a positive int or None, got {n_queries!r}")
        if (
            isinstance(flush_every, bool)
            or not isinstance(flush_every, (int, np.integer))
            or flush_every < 0
        ):
            raise ConfigurationError(f"flush_every must be an int >= 0, got {flush_every!r}")
        if group_names is not None:
            group_names = [str(g) for g in group_names]
            if not group_names or len(set(group_names)) != len(group_names):
                raise ConfigurationError(
                    f"group_names must be non-empty and unique, got {group_names!r}"
                )
        if metadata is not None:
            try:
                json.dumps(metadata)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"metadata must be JSON-serializable: {exc}") from exc
        self.path = Path(path)
        self._n_queries = None if n_queries is None else int(n_queries)
        self._n_queries_fixed = n_queries is not None
        self.group_names = group_names
        self.record_steps = bool(record_steps)
        self.flush_every = int(flush_every)
        self._closed = False
        self._buffer_records: list[np.ndarray] = []
        self._buffer_stats: list[np.ndarray] = []
        self._buffer_steps = 0
        self._std_source: str | None = None
        self._degenerate = 0
        self._n_steps = 0
        self._first_step: int | None = None
        self._warned_groups = False
        self._warned_gap = False
        self._resumed_at: int | None = None
        self._totals: _Totals | None = None

        header = self._open_dir(resume)
        if header is None:
            self._header: dict[str, Any] = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "library_version": _library_version(),
                "created": _now(),
                "record_steps": self.record_steps,
                "metadata": dict(metadata or {}),
                "generation": 0,
                "totals": None,
                "chunks": [],
                "last_step": 0,
            }
            self._last_step = 0
            self._flushed_step = 0
            if self._n_queries_fixed:
                self._totals = _Totals(self._n_queries, len(self.group_names or []))
        else:
            self._resume_from(header, metadata)

    # -- opening ---------------------------------------------------------------------------

    def _open_dir(self, resume: bool) -> dict[str, Any] | None:
        root = self.path
        if root.exists() and not root.is_dir():
            raise LogError(f"{root}: exists and is a file; a value log is a directory")
        if (root / META_FILE).exists():
            if not resume:
                raise LogError(
                    f"{root}: a value log already exists here; pass resume=True to continue it "
                    "or pick a new path"
                )
            header = _read_header(root)
            _clean_strays(root, header)
            return header
        if root.exists():
            others = [
                c.name
                for c in root.iterdir()
                if not (_TMP_FILE.match(c.name) or _DATA_FILE.match(c.name))
            ]
            if others:
                raise LogError(
                    f"{root}: directory is not empty and holds no value log "
                    f"(found {sorted(others)[:5]}); pick a new path"
                )
            _clean_strays(root, None)  # leftovers of a run killed before its first flush
        root.mkdir(parents=True, exist_ok=True)
        return None

    def _resume_from(self, header: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        log_q = header.get("n_queries")
        log_groups = header.get("group_names")
        meta = self.path / META_FILE
        if header.get("record_steps") != self.record_steps:
            raise LogError(
                f"{meta}: log was written with record_steps={header.get('record_steps')}, "
                f"resumed with record_steps={self.record_steps}; pass the same value"
            )
        if self._n_queries_fixed and header.get("n_steps", 0) and log_q != self._n_queries:
            raise LogError(
                f"{meta}: log has n_queries={log_q}, resumed with n_queries={self._n_queries}"
            )
        if (
            self.group_names is not None
            and (log_groups is not None or header.get("n_steps", 0))
            and log_groups != self.group_names
        ):
            raise LogError(
                f"{meta}: log has group_names={log_groups}, resumed with {self.group_names}"
            )
        if header.get("n_steps", 0):
            self._n_queries = log_q
            self._n_queries_fixed = True
        if log_groups is not None:
            self.group_names = list(log_groups)
        self._header = header
        if metadata:
            header.setdefault("metadata", {}).update(metadata)
        self._last_step = self._flushed_step = int(header["last_step"])
        self._resumed_at = self._last_step if self._last_step > 0 else None
        self._n_steps = int(header.get("n_steps", 0))
        self._first_step = header.get("first_step")
        self._degenerate = int(header.get("degenerate_steps", 0))
        self._std_source = header.get("std_source")
        header.setdefault("resumed", []).append({"at": _now(), "after_step": self._last_step})
        if self._n_queries_fixed:
            n_groups = len(self.group_names or [])
            self._totals = _Totals(self._n_queries, n_groups)
            arrays = _read_totals(self.path, header, self._n_queries, n_groups, verify=True)
            self._totals.load_sparse(arrays)

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
            Dict with ``ids`` ``[n]``, ``value_sum`` ``[n]``/``[n, Q]``, ``count``, ``std_sum``
            and, with groups, ``group_sum`` ``[n, G]``; copies.
        """
        if self._totals is None:
            return {"ids": np.zeros(0, np.int64)}
        return self._totals.sparse()

    def state_dict(self) -> dict[str, Any]:
        """A small cursor for training checkpoints.

        Call :meth:`flush` before saving a training checkpoint so the log is never behind it;
        on restart open the same path with ``resume=True``: steps up to ``flushed_step`` that
        the resumed run replays are ignored.
        """
        return {
            "path": str(self.path),
            "format_version": FORMAT_VERSION,
            "last_step": self._last_step,
            "flushed_step": self._flushed_step,
        }

    # -- adding -----------------------------------------------------------------------------

    def add_step(
        self,
        step: int,
        ids: Any,
        values: Any,
        group_values: Any = None,
        *,
        step_std: Any = None,
    ) -> bool:
        """Add one optimizer step's values.

        Args:
            step: global optimizer step (starts at 1; strictly increasing across calls).
            ids: ``[n]`` int64 sample ids (dataset indices), unique, non-negative.
            values: ``[n]`` or ``[n, Q]`` float values, in units of validation loss, positive =
                the sample reduced the validation loss.
            group_values: optional ``[n, G]`` split of 1-D ``values`` over the parameter groups
                (rows sum to ``values``).
            step_std: optional standard deviation of the whole step's values (``[]`` or ``[Q]``)
                to standardize with instead of this call's own, e.g. all-reduced across DDP
                ranks; non-positive entries fall back to 1.

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
            raise ConfigurationError(
                f"step {step} added after step {self._last_step}; steps must increase"
            )
        ids_arr = _as_numpy(ids)
        vals = _as_numpy(values)
        if ids_arr.ndim != 1:
            raise SampleIdError(f"step {step}: ids must be 1-D, got shape {ids_arr.shape}")
        if ids_arr.size and not np.issubdtype(ids_arr.dtype, np.integer):
            raise SampleIdError(f"step {step}: ids must be integers, got dtype {ids_arr.dtype}")
        ids_arr = ids_arr.astype(np.int64, copy=False)
        n = ids_arr.shape[0]
        if n and (ids_arr.min() < 0 or ids_arr.max() >= MAX_SAMPLE_ID):
            raise SampleIdError(
                f"step {step}: ids must be dataset indices in [0, 2**32), got min {ids_arr.min()}, "
                f"max {ids_arr.max()}"
            )
        if n and np.unique(ids_arr).shape[0] != n:
            raise SampleIdError(f"step {step}: ids are duplicated within the step")
        vals = vals.astype(np.float64, copy=False)
        if vals.ndim not in (1, 2) or vals.shape[0] != n:
            raise ConfigurationError(
                f"step {step}: values must be [n] or [n, Q] with n = {n} ids, got {vals.shape}"
            )
        q = None if vals.ndim == 1 else int(vals.shape[1])
        if not self._n_queries_fixed:
            self._n_queries, self._n_queries_fixed = q, True
        if q != self._n_queries:
            want = "[n]" if self._n_queries is None else f"[n, {self._n_queries}]"
            raise ConfigurationError(
                f"step {step}: values have shape {vals.shape}, log expects {want}"
            )
        if not np.all(np.isfinite(vals)):
            raise NonFiniteError(f"step {step}: values contain NaN or inf; the training diverged?")
        gvals = None
        if group_values is not None:
            gvals = _as_numpy(group_values).astype(np.float64, copy=False)
            if self.group_names is None:
                raise ConfigurationError("group_values given but the writer has no group_names")
            if q is not None:
                raise ConfigurationError("group_values are only supported with 1-D values")
            if gvals.shape != (n, len(self.group_names)):
                raise ConfigurationError(
                    f"step {step}: group_values must be [{n}, {len(self.group_names)}], "
                    f"got {gvals.shape}"
                )
            if not np.all(np.isfinite(gvals)):
                raise NonFiniteError(f"step {step}: group_values contain NaN or inf")
            if n and not self._warned_groups:
                tol = 1e-4 * max(float(np.abs(vals).max()), 1e-30)
                if np.abs(gvals.sum(axis=1) - vals).max() > tol:
                    warnings.warn(
                        f"step {step}: group_values do not sum to values over groups",
                        stacklevel=2,
                    )
                    self._warned_groups = True
        elif self.group_names is not None:
            raise ConfigurationError(
                f"step {step}: the log has groups {self.group_names}; pass group_values"
            )
        if self._totals is None:
            self._totals = _Totals(self._n_queries, len(self.group_names or []))

        # per-step standardization
        cnt, mean, m2 = step_moments(vals)
        if step_std is None:
            scale = step_scale(cnt, m2)
            source = "local"
        else:
            given = np.broadcast_to(np.asarray(step_std, np.float64), mean.shape)
            scale = np.where(np.isfinite(given) & (given > 0), given, 1.0)
            source = "given"
        if self._std_source is None:
            self._std_source = source
        elif self._std_source != source:
            self._std_source = "mixed"
        local_std = np.sqrt(np.maximum(m2, 0.0) / max(cnt, 1))
        if cnt < 2 or not np.all(np.isfinite(local_std) & (local_std > 0)):
            self._degenerate += 1
        if self._resumed_at is not None and not self._warned_gap:
            if step > self._resumed_at + 1:
                warnings.warn(
                    f"{self.path}: resumed log ends at step {self._resumed_at} but the next step "
                    f"added is {step}; the steps in between are missing from the log",
                    stacklevel=2,
                )
            self._warned_gap = True

        t = self._totals
        if n:
            t.grow(int(ids_arr.max()) + 1)
            t.value_sum[ids_arr] += vals
            t.std_sum[ids_arr] += vals / scale
            t.count[ids_arr] += 1
            if gvals is not None:
                t.group_sum[ids_arr] += gvals
        if self.record_steps:
            rec = np.zeros(n, dtype=_record_dtype(self._n_queries, len(self.group_names or [])))
            order = np.argsort(ids_arr, kind="stable")  # records sorted by (step, id)
            rec["step"] = step
            rec["id"] = ids_arr[order]
            rec["value"] = vals[order]
            if gvals is not None:
                rec["group_value"] = gvals[order]
            self._buffer_records.append(rec)
        st = np.zeros(1, dtype=_stats_dtype(self._n_queries))
        st["step"], st["n"], st["mean"], st["m2"], st["scale"] = step, cnt, mean, m2, scale
        self._buffer_stats.append(st)
        self._buffer_steps += 1
        self._n_steps += 1
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        if self.flush_every and self._buffer_steps >= self.flush_every:
            self.flush()
        return True

    # -- persisting -------------------------------------------------------------------------

    def flush(self) -> None:
        """Commit everything added so far to disk (atomic; no-op when nothing is pending).

        Raises:
            OSError: the disk write failed; the log on disk is left as of the previous flush and
                the pending steps stay in memory for a retry.
        """
        if self._buffer_steps == 0 and self._header["generation"] > 0:
            return
        root = self.path
        root.mkdir(parents=True, exist_ok=True)
        gen = int(self._header["generation"]) + 1
        header = dict(self._header)
        chunks = list(header["chunks"])
        if self._buffer_steps:
            stats = np.concatenate(self._buffer_stats)
            entry: dict[str, Any] = {
                "first_step": int(stats["step"][0]),
                "last_step": int(stats["step"][-1]),
                "n_steps": int(stats.shape[0]),
                "steps": None,
            }
            if self.record_steps:
                records = np.concatenate(self._buffer_records)
                entry["steps"] = atomic_write(root / f"steps-{gen:06d}.npy", npy_bytes(records))
                entry["steps"]["rows"] = int(records.shape[0])
            entry["stats"] = atomic_write(root / f"stats-{gen:06d}.npy", npy_bytes(stats))
            entry["stats"]["rows"] = int(stats.shape[0])
            chunks.append(entry)
        totals_entry = None
        n_ids = max_id = 0
        if self._totals is not None:
            sparse = self._totals.sparse()
            n_ids = int(sparse["ids"].shape[0])
            max_id = int(sparse["ids"][-1]) if n_ids else -1
            totals_entry = atomic_write(root / f"totals-{gen:06d}.npz", npz_bytes(sparse))
        old_totals = header.get("totals")
        header.update(
            {
                "generation": gen,
                "updated": _now(),
                "n_queries": self._n_queries,
                "group_names": self.group_names,
                "last_step": self._last_step,
                "first_step": self._first_step,
                "n_steps": self._n_steps,
                "n_ids": n_ids,
                "max_id": max_id,
                "std_source": self._std_source,
                "degenerate_steps": self._degenerate,
                "totals": totals_entry,
                "chunks": chunks,
            }
        )
        atomic_write(root / META_FILE, json.dumps(header, indent=1).encode())  # commit point
        _fsync_dir(root)
        self._header = header
        self._flushed_step = self._last_step
        self._buffer_records, self._buffer_stats, self._buffer_steps = [], [], 0
        if old_totals:
            try:
                (root / old_totals["file"]).unlink()
            except OSError:
                pass

    def close(self) -> None:
        """Flush and close; further :meth:`add_step` calls raise :class:`LogError`."""
        if not self._closed:
            self.flush()
            self._closed = True

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


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class ShapleyLog:
    """A value log read back into memory.

    Arrays are dense and indexed by sample id (length ``max_id + 1``; 0 for ids never seen).

    Attributes:
        values: ``[n_ids]`` (or ``[n_ids, Q]``) float64 sum over steps of the value; positive =
            the sample reduced the validation loss; units of validation loss.
        counts: ``[n_ids]`` int64 number of steps each id appeared in.
        seen: ``[n_ids]`` bool, ``counts > 0``.
        ids: ``[n_seen]`` int64 sorted ids that appeared at least once.
        std_values: like ``values``, the sum of per-step standardized values (unitless).
        group_values: ``[n_ids, G]`` per-group split of ``values``, or None.
        group_names: the G group names, or None.
        steps: per-step records as a structured array (``step``, ``id``, ``value``
            [, ``group_value``]) sorted by step then id, or None when not recorded.
        step_stats: per-step statistics (``step``, ``n``, ``mean``, ``m2``, ``scale``).
        metadata: the user metadata dict given to the writer.
        header: the full parsed ``meta.json``.
        n_queries: Q, or None for a single validation direction.
        last_step: last committed optimizer step (0 for an empty log).
        path: where it was read from (None when built in memory).
    """

    def __init__(
        self,
        *,
        values: np.ndarray,
        counts: np.ndarray,
        std_values: np.ndarray,
        group_values: np.ndarray | None,
        group_names: list[str] | None,
        steps: np.ndarray | None,
        step_stats: np.ndarray,
        header: dict[str, Any],
        path: Path | None = None,
    ) -> None:
        self.values = values
        self.counts = counts
        self.std_values = std_values
        self.group_values = group_values
        self.group_names = group_names
        self.steps = steps
        self.step_stats = step_stats
        self.header = header
        self.path = path
        self.seen = counts > 0
        self.ids = np.flatnonzero(self.seen).astype(np.int64)
        self.n_queries: int | None = header.get("n_queries")
        self.last_step = int(header.get("last_step", 0))
        self.metadata: dict[str, Any] = dict(header.get("metadata") or {})

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, verify: bool = True, progress: bool = False
    ) -> "ShapleyLog":
        """Read a log directory.

        A directory with no ``meta.json`` whose subdirectories ``rank*`` are logs is read as
        the per-rank logs of one DDP run and merged in memory (see :meth:`merge`).

        Args:
            path: the log directory.
            verify: check every file's CRC-32 against the header.
            progress: show a tqdm bar while reading many chunks.

        Raises:
            LogError: missing path, missing or corrupt ``meta.json``, a listed file missing,
                truncated, corrupt or inconsistent with the header.
        """
        root = Path(path)
        if root.is_dir() and not (root / META_FILE).exists():
            ranks = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("rank"))
            if ranks:
                return cls.merge(ranks, verify=verify, progress=progress)
        header = _read_header(root)
        q = header.get("n_queries")
        groups = header.get("group_names")
        if q is not None and (not isinstance(q, int) or q < 1):
            raise LogError(f"{root / META_FILE}: bad n_queries {q!r}")
        n_groups = len(groups) if groups else 0
        arrays = _read_totals(root, header, q, n_groups, verify)
        chunks = header["chunks"]
        if not isinstance(chunks, list):
            raise LogError(f"{root / META_FILE}: 'chunks' is not a list; the header is corrupt")
        try:
            stat_entries = [c["stats"] for c in chunks]
            step_entries = [c["steps"] for c in chunks if c.get("steps")]
        except (KeyError, TypeError) as exc:
            raise LogError(
                f"{root / META_FILE}: bad chunk entry ({exc}); the header is corrupt"
            ) from exc
        stats = _read_chunks(root, stat_entries, _stats_dtype(q), "stats", verify, progress)
        steps = None
        if header.get("record_steps"):
            if len(step_entries) != len(chunks):
                raise LogError(f"{root / META_FILE}: some chunks lack their per-step records")
            steps = _read_chunks(
                root, step_entries, _record_dtype(q, n_groups), "steps", verify, progress
            )
        totals = _Totals(q, n_groups)
        totals.load_sparse(arrays)
        size = totals.size
        return cls(
            values=totals.value_sum[:size].copy(),
            counts=totals.count[:size].copy(),
            std_values=totals.std_sum[:size].copy(),
            group_values=None if totals.group_sum is None else totals.group_sum[:size].copy(),
            group_names=list(groups) if groups else None,
            steps=steps,
            step_stats=stats,
            header=header,
            path=root,
        )

    # -- scores -----------------------------------------------------------------------------

    def scores(self, normalize: str = "step_std", query: int | str | None = None) -> np.ndarray:
        """Per-id scores for ranking (higher = more valuable).

        ``"step_std"`` (recommended, the default) is the sum of per-step standardized values:
        raw sums are dominated by the first epoch because early steps have much larger values
        (DESIGN.md, "Using values for selection": label-noise AUC 0.94 vs 0.89 for raw sums).

        Args:
            normalize: ``"none"`` (raw sum, validation-loss units), ``"step_std"`` (sum of
                per-step standardized values, unitless) or ``"mean"`` (raw sum / count: mean
                value per appearance).
            query: for per-query logs: None = all columns ``[n_ids, Q]``, an int = that
                column, ``"mean"`` = mean over queries (the value for the mean validation loss
                when ``normalize`` is "none" or "mean"). Must be None for 1-D logs (or "mean").

        Returns:
            ``[n_ids]`` (or ``[n_ids, Q]``) float64, indexed by id; 0 for ids never seen.

        Raises:
            ConfigurationError: unknown normalization or bad query.
        """
        if normalize == "none":
            base = self.values
        elif normalize == "step_std":
            base = self.std_values
        elif normalize == "mean":
            denom = np.maximum(self.counts, 1).astype(np.float64)
            base = self.values / (denom if self.values.ndim == 1 else denom[:, None])
        else:
            raise ConfigurationError(
                f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}"
            )
        return _select_query(base, self.n_queries, query).copy()

    def top(
        self,
        query: int | str | None = None,
        k: int = 10,
        *,
        normalize: str = "none",
        largest: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k seen ids with the largest (or smallest) score for one query.

        Args:
            query: column of a per-query log (int or ``"mean"``); None for 1-D logs.
            k: how many.
            normalize: see :meth:`scores`.
            largest: False gives the k smallest (most harmful).

        Returns:
            ``(ids, scores)``, each ``[min(k, n_seen)]``, best first; ties by ascending id.
        """
        if self.n_queries is not None and query is None:
            raise ConfigurationError("top() on a per-query log needs query=<column> or 'mean'")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ConfigurationError(f"k must be an int >= 0, got {k!r}")
        s = self.scores(normalize, query)[self.ids]
        key = -s if largest else s
        order = np.lexsort((self.ids, key))[:k]
        return self.ids[order].copy(), s[order]

    # -- export -----------------------------------------------------------------------------

    def to_pandas(self):
        """One row per seen id: ``id``, ``value``, ``count``, ``std_value``, and extra columns.

        Per-query logs: ``value`` / ``std_value`` are means over queries and ``value_q{j}`` /
        ``std_value_q{j}`` hold each column; grouped logs add ``group_{name}`` columns.

        Raises:
            ImportError: pandas is not installed (``pip install inrun-shapley[pandas]``).
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - pandas is a dev dependency
            raise ImportError(
                "ShapleyLog.to_pandas needs pandas: pip install 'inrun-shapley[pandas]'"
            ) from exc
        ids = self.ids
        cols: dict[str, np.ndarray] = {"id": ids}
        if self.n_queries is None:
            cols["value"] = self.values[ids]
            cols["count"] = self.counts[ids]
            cols["std_value"] = self.std_values[ids]
        else:
            cols["value"] = self.values[ids].mean(axis=1)
            cols["count"] = self.counts[ids]
            cols["std_value"] = self.std_values[ids].mean(axis=1)
            for j in range(self.n_queries):
                cols[f"value_q{j}"] = self.values[ids, j]
            for j in range(self.n_queries):
                cols[f"std_value_q{j}"] = self.std_values[ids, j]
        if self.group_values is not None:
            for j, name in enumerate(self.group_names or []):
                cols[f"group_{name}"] = self.group_values[ids, j]
        return pd.DataFrame(cols)

    def step_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Per step, the sum of the step's values (the linear part of its validation-loss drop).

        Returns:
            ``(steps [T], totals [T] or [T, Q])`` from the per-step stats (``n · mean``).
        """
        st = self.step_stats
        n = st["n"].astype(np.float64)
        mean = st["mean"]
        tot = mean * (n if mean.ndim == 1 else n[:, None])
        return st["step"].copy(), tot

    def save(self, path: str | os.PathLike) -> Path:
        """Write this log as a new log directory (one chunk); returns the path.

        Raises:
            LogError: ``path`` already holds a log or other files.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LogError(f"{root}: exists and is not an empty directory; pick a new path")
        root.mkdir(parents=True, exist_ok=True)
        header = dict(self.header)
        header.pop("resumed", None)
        header["format"] = FORMAT_NAME
        header["format_version"] = FORMAT_VERSION
        header["generation"] = 1
        header["updated"] = _now()
        ids = self.ids
        sparse = {
            "ids": ids,
            "value_sum": self.values[ids],
            "count": self.counts[ids],
            "std_sum": self.std_values[ids],
        }
        if self.group_values is not None:
            sparse["group_sum"] = self.group_values[ids]
        header["n_ids"] = int(ids.shape[0])
        header["max_id"] = int(ids[-1]) if ids.size else -1
        header["record_steps"] = self.steps is not None
        header["totals"] = atomic_write(root / "totals-000001.npz", npz_bytes(sparse))
        chunks = []
        if self.step_stats.shape[0]:
            entry: dict[str, Any] = {
                "first_step": int(self.step_stats["step"][0]),
                "last_step": int(self.step_stats["step"][-1]),
                "n_steps": int(self.step_stats.shape[0]),
                "steps": None,
            }
            if self.steps is not None:
                entry["steps"] = atomic_write(root / "steps-000001.npy", npy_bytes(self.steps))
                entry["steps"]["rows"] = int(self.steps.shape[0])
            entry["stats"] = atomic_write(root / "stats-000001.npy", npy_bytes(self.step_stats))
            entry["stats"]["rows"] = int(self.step_stats.shape[0])
            chunks.append(entry)
        header["chunks"] = chunks
        atomic_write(root / META_FILE, json.dumps(header, indent=1).encode())
        _fsync_dir(root)
        return root

    # -- merging ----------------------------------------------------------------------------

    @classmethod
    def merge(
        cls,
        paths: Sequence[str | os.PathLike | "ShapleyLog"],
        out_path: str | os.PathLike | None = None,
        *,
        verify: bool = True,
        progress: bool = False,
    ) -> "ShapleyLog":
        """Combine the per-rank logs of one distributed run.

        Each rank writes its own log (conventionally ``<run>/rank{r}``; ranks must never share a
        directory); ``ShapleyLog.load("<run>")`` on a directory with no ``meta.json`` but
        ``rank*`` sub-logs merges them in memory through this method. Records of a merged log
        are sorted by (step, id); merging holds every rank's records in memory.

        Totals (``values``, ``counts``, ``group_values``) add. Per-step statistics are combined
        exactly across ranks (Chan's formula), giving the global per-step standard deviation.
        ``std_values`` are then:

        * recomputed exactly from the per-step records with the global scale when every rank
          recorded its steps and standardized with its own local std (``std_source`` becomes
          ``"merged-global"``);
        * added as they are when every rank was given the global std (``step_std=`` in
          :meth:`ShapleyLogWriter.add_step`);
        * otherwise added as they are, which mixes per-rank standardizations: a warning is
          issued and ``std_source`` becomes ``"merged-per-rank"``.

        Args:
            paths: rank log directories (or loaded logs).
            out_path: when given, the merged log is also written there.
            verify: check checksums while reading.
            progress: tqdm bars while reading.

        Returns:
            The merged :class:`ShapleyLog` (held in memory).

        Raises:
            LogError: no logs, or logs with different ``n_queries`` / ``group_names``.
        """
        logs = [
            p if isinstance(p, ShapleyLog) else cls.load(p, verify=verify, progress=progress)
            for p in paths
        ]
        if not logs:
            raise LogError("merge: no logs given")
        names = [str(lg.path) for lg in logs]
        q = logs[0].n_queries
        groups = logs[0].group_names
        for lg, name in zip(logs[1:], names[1:]):
            if lg.n_queries != q or lg.group_names != groups:
                raise LogError(
                    f"merge: {name} has n_queries={lg.n_queries}, groups={lg.group_names}; "
                    f"{names[0]} has n_queries={q}, groups={groups}: not the same run"
                )
        if len({lg.last_step for lg in logs}) > 1:
            warnings.warn(
                "merge: the rank logs end at different steps "
                f"{[lg.last_step for lg in logs]}; the merged log covers them unevenly",
                stacklevel=2,
            )
        n_groups = len(groups or [])
        size = max(lg.counts.shape[0] for lg in logs)
        totals = _Totals(q, n_groups)
        totals.grow(size)
        for lg in logs:
            m = lg.counts.shape[0]
            totals.value_sum[:m] += lg.values
            totals.count[:m] += lg.counts
            if totals.group_sum is not None:
                totals.group_sum[:m] += lg.group_values

        # combine per-step moments across ranks
        all_stats = np.concatenate([lg.step_stats for lg in logs])
        order = np.argsort(all_stats["step"], kind="stable")
        all_stats = all_stats[order]
        uniq, starts = np.unique(all_stats["step"], return_index=True)
        ends = np.append(starts[1:], all_stats.shape[0])
        stats = np.zeros(uniq.shape[0], dtype=_stats_dtype(q))
        for k, (a, b) in enumerate(zip(starts, ends)):
            part = all_stats[a:b]
            n, mean, m2 = combine_moments(part["n"], part["mean"], part["m2"])
            stats[k]["step"], stats[k]["n"], stats[k]["mean"], stats[k]["m2"] = uniq[k], n, mean, m2
            stats[k]["scale"] = step_scale(n, m2)
        m2_flat = stats["m2"].reshape(stats.shape[0], -1)
        degenerate = int(np.sum((stats["n"] < 2) | np.any(m2_flat <= 0, axis=1)))

        sources = {lg.header.get("std_source") for lg in logs} - {None}
        records = None
        if all(lg.steps is not None for lg in logs):
            records = np.concatenate([lg.steps for lg in logs])
            records = records[np.lexsort((records["id"], records["step"]))]
            dup = (np.diff(records["step"]) == 0) & (np.diff(records["id"]) == 0)
            if np.any(dup):
                warnings.warn(
                    f"merge: {int(dup.sum())} (step, id) pairs appear on several ranks (e.g. "
                    "DistributedSampler padding); their values add and each appearance counts",
                    stacklevel=2,
                )
        if records is not None and sources <= {"local"}:
            pos = np.searchsorted(stats["step"], records["step"])
            scale = stats["scale"][pos]
            std = records["value"] / scale
            rid = records["id"]
            if q is None:
                totals.std_sum[:size] = np.bincount(rid, weights=std, minlength=size)[:size]
            else:
                for j in range(q):
                    totals.std_sum[:size, j] = np.bincount(rid, weights=std[:, j], minlength=size)[
                        :size
                    ]
            std_source = "merged-global"
        else:
            for lg in logs:
                totals.std_sum[: lg.counts.shape[0]] += lg.std_values
            if sources == {"given"}:
                std_source = "given"
            else:
                std_source = "merged-per-rank"
                if len(logs) > 1:
                    warnings.warn(
                        "merge: std_values add per-rank standardizations (no per-step records "
                        "to recompute the global step std); record_steps=True or "
                        "add_step(step_std=...) avoids this",
                        stacklevel=2,
                    )

        first = logs[0].header
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "created": first.get("created"),
            "updated": _now(),
            "record_steps": records is not None,
            "metadata": dict(first.get("metadata") or {}),
            "n_queries": q,
            "group_names": groups,
            "last_step": max(lg.last_step for lg in logs),
            "first_step": int(stats["step"][0]) if stats.shape[0] else None,
            "n_steps": int(stats.shape[0]),
            "std_source": std_source,
            "degenerate_steps": degenerate,
            "merged_from": names,
            "generation": 0,
            "totals": None,
            "chunks": [],
        }
        merged = cls(
            values=totals.value_sum[:size].copy(),
            counts=totals.count[:size].copy(),
            std_values=totals.std_sum[:size].copy(),
            group_values=None if totals.group_sum is None else totals.group_sum[:size].copy(),
            group_names=list(groups) if groups else None,
            steps=records,
            step_stats=stats,
            header=header,
        )
        if out_path is not None:
            merged.path = merged.save(out_path)
            merged.header = _read_header(merged.path)
        return merged

    def __repr__(self) -> str:
        return (
            f"ShapleyLog(path={str(self.path)!r}, n_seen={self.ids.shape[0]}, "
            f"last_step={self.last_step}, n_queries={self.n_queries}, groups={self.group_names})"
        )


def _select_query(base: np.ndarray, n_queries: int | None, query: int | str | None) -> np.ndarray:
    if n_queries is None:
        if query not in (None, "mean", 0):
            raise ConfigurationError(
                f"this log has a single value per sample; query={query!r} is invalid"
            )
        return base
    if query is None:
        return base
    if query == "mean":
        return base.mean(axis=1)
    if (
        isinstance(query, bool)
        or not isinstance(query, (int, np.integer))
        or not 0 <= query < n_queries
    ):
        raise ConfigurationError(
            f"query must be 'mean' or an int in [0, {n_queries}), got {query!r}"
        )
    return base[:, int(query)]


def merge_logs(
    paths: Sequence[str | os.PathLike], out_path: str | os.PathLike | None = None, **kwargs: Any
) -> ShapleyLog:
    """Function form of :meth:`ShapleyLog.merge`."""
    return ShapleyLog.merge(paths, out_path, **kwargs)


__all__ = [
    "FORMAT_VERSION",
    "ShapleyLog",
    "ShapleyLogWriter",
    "combine_moments",
    "merge_logs",
    "step_moments",
    "step_scale",
]
