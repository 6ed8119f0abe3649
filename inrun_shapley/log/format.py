"""On-disk format of a value log: file names, checked reads and writes.

A log is a directory holding

* ``meta.json``: the header and the commit point (see :mod:`inrun_shapley.log.header`). It
  lists every data file with its byte size and CRC-32; files it does not list do not exist as
  far as readers are concerned.
* ``totals-GGGGGG.npz``: the *base* snapshot, uncompressed ``np.savez`` of the per-id fields
  over seen ids only (``ids`` int64 ``[n]`` sorted and unique, ``value_sum`` ``[n]`` or
  ``[n, Q]``, ``count`` int64 ``[n]``, ``std_sum`` like ``value_sum``, ``group_sum`` ``[n, G]``
  when groups are logged). Written by a compaction (on close, or when the deltas outgrow it).
* ``delta-GGGGGG.npz``: the same arrays holding what the steps of one flush *added*, over the
  ids those steps touched. A flush writes one delta: its cost is proportional to what changed,
  not to the number of ids. Totals = base + every listed delta (all fields are sums).
* ``steps-GGGGGG.npy``: per-step records of one flush (fields ``step``, ``id``, ``value``,
  ``group_value`` with groups), only when steps are recorded. Appended, never rewritten.
* ``stats-GGGGGG.npy``: per-step statistics of the same flush (``step``, ``n``, ``mean``,
  ``m2``, ``scale``), always written; they let a merge recompute the global per-step scale.

* ``.writer.lock``: present while a writer is open (see :mod:`inrun_shapley.log.lock`): one
  writer per log; a second is refused at open, a crashed writer's lock is taken over.

``G`` is the generation (the flush counter). Every file is written to a temporary name, fsynced
and moved into place with ``os.replace``, and ``meta.json`` is written last, so a kill at any
moment leaves the log exactly as of its last complete flush; stray files of an interrupted
flush are ignored by readers and removed on resume.

Containment: a log's files stay inside its directory. Names are checked against the patterns
below (no path separators) and readers refuse symbolic links and anything that resolves outside
the directory, with :class:`~inrun_shapley.errors.LogError`.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from inrun_shapley.errors import LogError
from inrun_shapley.log.fields import Field

FORMAT_NAME = "inrun-shapley-log"
FORMAT_VERSION = 2
META_FILE = "meta.json"

DATA_FILE = re.compile(r"^(totals-\d{6}\.npz|delta-\d{6}\.npz|steps-\d{6}\.npy|stats-\d{6}\.npy)$")
TMP_FILE = re.compile(r"^\..*\.tmp$")


def now() -> str:
    """UTC time stamp for headers."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_version() -> str:
    """The installed inrun-shapley version (``"unknown"`` if it cannot be read)."""
    try:
        from inrun_shapley._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (no-op where directories cannot be opened)."""
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


def inside(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused unless it is a plain entry of ``root`` itself.

    Raises:
        LogError: ``name`` is a symbolic link or resolves outside ``root``.
    """
    path = root / name
    if path.is_symlink():
        raise LogError(
            f"{path}: {what} is a symbolic link; a value log keeps its files inside its own "
            "directory. Copy the real file there (or the whole log with its files) and retry"
        )
    try:
        outside = path.resolve().parent != root.resolve()
    except (OSError, RuntimeError) as exc:
        raise LogError(f"{path}: cannot resolve {what} ({exc})") from exc
    if outside:
        raise LogError(f"{path}: {what} resolves outside the log directory {root}; refusing to read it")
    return path


def read_checked(root: Path, entry: dict[str, Any], verify: bool) -> bytes:
    """The bytes of one listed data file, checked against its header entry.

    Raises:
        LogError: missing, a link, outside the directory, truncated or (``verify``) corrupt.
    """
    path = inside(root, entry["file"], "a data file")
    if not path.is_file():
        raise LogError(f"{path}: file listed in meta.json is missing; the log is incomplete")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LogError(f"{path}: unreadable ({exc})") from exc
    if len(data) != entry["bytes"]:
        raise LogError(
            f"{path}: truncated or overwritten: {len(data)} bytes on disk, {entry['bytes']} "
            "recorded in meta.json"
        )
    if verify and (zlib.crc32(data) & 0xFFFFFFFF) != entry["crc32"]:
        raise LogError(f"{path}: checksum mismatch; the file is corrupt")
    return data


def read_table(root: Path, entry: dict[str, Any], fields: Sequence[Field], verify: bool) -> dict[str, np.ndarray]:
    """A base or delta file: ``ids`` sorted unique non-negative, fields aligned to them.

    Raises:
        LogError: unreadable, missing arrays, or shapes/dtypes that do not match the header.
    """
    data = read_checked(root, entry, verify)
    path = root / entry["file"]
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise LogError(f"{path}: unreadable totals file ({exc})") from exc
    need = ["ids"] + [f.name for f in fields]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise LogError(f"{path}: totals file lacks arrays {missing}")
    ids = arrays["ids"]
    n = ids.shape[0] if ids.ndim == 1 else -1
    expected = {"ids": ((n,), np.int64), **{f.name: ((n, *f.shape), f.dtype) for f in fields}}
    for k in need:
        shape, dtype = expected[k]
        if arrays[k].shape != shape or arrays[k].dtype != dtype:
            raise LogError(
                f"{path}: array {k!r} has shape {arrays[k].shape} dtype {arrays[k].dtype}, expected "
                f"{shape} {np.dtype(dtype)}; the file does not match the header"
            )
    if n and (ids.min() < 0 or np.any(np.diff(ids) <= 0)):
        raise LogError(f"{path}: ids are not sorted, unique and non-negative; corrupt totals")
    return {k: arrays[k] for k in need}


def read_chunks(
    root: Path, entries: Sequence[dict[str, Any]], dtype: np.dtype, what: str, verify: bool, progress: bool
) -> np.ndarray:
    """Concatenated ``.npy`` chunks (per-step records or stats), each checked.

    Raises:
        LogError: a chunk is unreadable, of another dtype, or of another length than recorded.
    """
    parts = []
    iterator: Iterable = entries
    if progress and len(entries) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(entries, desc=f"reading {what}", unit="chunk", disable=None)
    for entry in iterator:
        data = read_checked(root, entry, verify)
        path = root / entry["file"]
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise LogError(f"{path}: unreadable {what} chunk ({exc})") from exc
        if arr.dtype != dtype:
            raise LogError(f"{path}: {what} chunk has dtype {arr.dtype}, expected {dtype}")
        if arr.ndim != 1 or arr.shape[0] != entry["rows"]:
            raise LogError(f"{path}: {what} chunk has {arr.shape} rows, {entry['rows']} recorded in {META_FILE}")
        parts.append(arr)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def listed_files(header: dict[str, Any] | None) -> set[str]:
    """Names of every data file a (validated) header lists."""
    if header is None:
        return set()
    names = {e["file"] for e in [header["totals"], *header["deltas"]] if e}
    for chunk in header["chunks"]:
        names.update(chunk[kind]["file"] for kind in ("steps", "stats") if chunk[kind])
    return names


def clean_strays(root: Path, header: dict[str, Any] | None) -> None:
    """Remove temp files and data files that the committed header does not list."""
    listed = listed_files(header)
    for child in root.iterdir():
        name = child.name
        if (child.is_file() or child.is_symlink()) and (
            TMP_FILE.match(name) or (DATA_FILE.match(name) and name not in listed)
        ):
            try:
                child.unlink()
            except OSError:  # pragma: no cover
                pass


__all__ = [
    "DATA_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_FILE",
    "TMP_FILE",
    "clean_strays",
    "fsync_dir",
    "inside",
    "library_version",
    "listed_files",
    "now",
    "read_checked",
    "read_chunks",
    "read_table",
]
