"""Writing a flush: data files first, then the header (the commit point), then cleanup.

The layout is described in :mod:`inrun_shapley.log.format`. A flush writes its per-step chunk,
then either a *delta* of the per-id fields over the ids its steps touched, or (a compaction) a
new base snapshot of all ids, and finally ``meta.json``. Files the new header no longer lists
(the base and deltas a compaction folded in) are removed only after the commit, so a kill at
any moment leaves either the previous or the new complete state.

Compaction policy: the first flush writes the base; later flushes write deltas until the listed
deltas would hold more rows than there are ids, or number ``MAX_DELTAS``; :meth:`close` always
compacts. Each compaction writes ``n_ids`` rows after at least as many delta rows were written,
so it costs ``O(1)`` amortized per changed row, and readers never sum more than about twice
the snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from inrun_shapley.atomic import atomic_write, npy_bytes, npz_bytes
from inrun_shapley.errors import LogError
from inrun_shapley.log.accumulator import IdAccumulator
from inrun_shapley.log.format import DATA_FILE, META_FILE, TMP_FILE, clean_strays, fsync_dir, listed_files
from inrun_shapley.log.header import read_header
from inrun_shapley.log.lock import LOCK_FILE

MAX_DELTAS = 64


def open_log_dir(root: Path, resume: bool, overwrite: bool = False) -> dict[str, Any] | None:
    """Prepare ``root`` for writing: the validated header of an existing log (``resume``), or
    None for a new log (the directory is created).

    With ``overwrite``, an existing log is first moved aside whole (one ``rename`` to a hidden
    sibling), then deleted: a crash at any moment leaves the old log complete (at ``root`` or
    aside), or no log, never a mix of old and new files.

    Raises:
        LogError: ``root`` is a file; a log exists and neither ``resume`` nor ``overwrite`` is
            set; the directory holds other files; the existing log's header is corrupt.
    """
    if root.exists() and not root.is_dir():
        raise LogError(f"{root}: exists and is a file; a value log is a directory")
    if (root / META_FILE).exists() or (root / META_FILE).is_symlink():
        if overwrite:
            _replace_aside(root)
        elif not resume:
            raise LogError(
                f"{root}: a value log already exists here; pass resume=True to continue it, overwrite=True "
                "to replace it, or pick a new path"
            )
        else:
            header = read_header(root)
            clean_strays(root, header)
            return header
    if root.exists():
        others = [c.name for c in root.iterdir()
                  if not (TMP_FILE.match(c.name) or DATA_FILE.match(c.name) or c.name == LOCK_FILE)]
        if others:
            raise LogError(
                f"{root}: directory is not empty and holds no value log (found {sorted(others)[:5]}); pick a new path"
            )
        clean_strays(root, None)  # leftovers of a run killed before its first flush
    root.mkdir(parents=True, exist_ok=True)
    return None


def _replace_aside(root: Path) -> None:
    """Move the log at ``root`` to a hidden sibling in one rename, then delete it there."""
    aside = root.with_name(f".{root.name}.replaced-{uuid.uuid4().hex[:12]}")
    os.replace(root, aside)
    fsync_dir(root.parent)
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        warnings.warn(f"{root}: the replaced log could not be deleted and remains at {aside}: {exc}",
                      RuntimeWarning, stacklevel=4)


def write_chunk(root: Path, gen: int, stats: np.ndarray, records: np.ndarray | None) -> dict[str, Any]:
    """Write one flush's per-step stats (and records); returns its ``chunks`` header entry."""
    entry: dict[str, Any] = {"first_step": int(stats["step"][0]), "last_step": int(stats["step"][-1]),
                             "n_steps": int(stats.shape[0]), "steps": None}
    if records is not None:
        entry["steps"] = dict(atomic_write(root / f"steps-{gen:06d}.npy", npy_bytes(records)), rows=int(records.shape[0]))
    entry["stats"] = dict(atomic_write(root / f"stats-{gen:06d}.npy", npy_bytes(stats)), rows=int(stats.shape[0]))
    return entry


def write_table(path: Path, acc: IdAccumulator) -> dict[str, Any]:
    """Write an accumulator's table (base or delta); returns its header entry with ``rows``."""
    return dict(atomic_write(path, npz_bytes(acc.table())), rows=len(acc))


def write_totals(root: Path, header: dict[str, Any], gen: int, totals: IdAccumulator, delta: IdAccumulator,
                 compact: bool) -> None:
    """Write this flush's delta, or compact into a new base, updating ``header`` in place."""
    listed_rows = sum(e["rows"] for e in header["deltas"]) + len(delta)
    if compact or header["totals"] is None or listed_rows > len(totals) or len(header["deltas"]) >= MAX_DELTAS:
        header["totals"] = write_table(root / f"totals-{gen:06d}.npz", totals)
        header["deltas"] = []
    elif len(delta):
        header["deltas"] = [*header["deltas"], write_table(root / f"delta-{gen:06d}.npz", delta)]


def commit(root: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Write ``meta.json`` atomically (the commit point), then remove what ``old`` listed and
    ``new`` does not."""
    atomic_write(root / META_FILE, json.dumps(new, indent=1).encode())
    fsync_dir(root)
    for name in listed_files(old) - listed_files(new):
        try:
            (root / name).unlink()
        except OSError:
            pass


__all__ = ["MAX_DELTAS", "commit", "open_log_dir", "write_chunk", "write_table", "write_totals"]
