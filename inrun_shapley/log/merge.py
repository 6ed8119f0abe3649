"""Merging the per-rank value logs of one distributed run.

Each rank writes its own log (conventionally ``<run>/rank{r}``; ranks never share a directory).
Per-id fields add (they are sums, see :mod:`inrun_shapley.log.fields`); per-step tables
concatenate; per-step moments combine exactly across ranks.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from inrun_shapley.errors import LogError
from inrun_shapley.log.accumulator import IdAccumulator
from inrun_shapley.log.fields import id_fields
from inrun_shapley.log.format import FORMAT_NAME, FORMAT_VERSION, library_version, now
from inrun_shapley.log.header import read_header
from inrun_shapley.log.moments import combine_step_stats
from inrun_shapley.log.reader import ShapleyLog


def _check_same_run(logs: list[ShapleyLog], names: list[str]) -> None:
    first = logs[0]
    for lg, name in zip(logs[1:], names[1:]):
        if lg.n_queries != first.n_queries or lg.group_names != first.group_names:
            raise LogError(
                f"merge: {name} has n_queries={lg.n_queries}, groups={lg.group_names}; {names[0]} has "
                f"n_queries={first.n_queries}, groups={first.group_names}: not the same run"
            )
        if lg.score != first.score:
            raise LogError(f"merge: {name} has score {lg.score}, {names[0]} has {first.score}: not the same run")
    if len({lg.last_step for lg in logs}) > 1:
        warnings.warn(
            f"merge: the rank logs end at different steps {[lg.last_step for lg in logs]}; the merged log "
            "covers them unevenly",
            stacklevel=3,
        )


def _merged_records(logs: list[ShapleyLog]) -> np.ndarray | None:
    if not all(lg.steps is not None for lg in logs):
        return None
    records = np.concatenate([lg.steps for lg in logs])
    records = records[np.lexsort((records["id"], records["step"]))]
    dup = (np.diff(records["step"]) == 0) & (np.diff(records["id"]) == 0)
    if np.any(dup):
        warnings.warn(
            f"merge: {int(dup.sum())} (step, id) pairs appear on several ranks (e.g. DistributedSampler "
            "padding); their values add and each appearance counts",
            stacklevel=3,
        )
    return records


def merge_logs(
    paths: Sequence[str | os.PathLike | ShapleyLog], out_path: str | os.PathLike | None = None, *,
    verify: bool = True, progress: bool = False,
) -> ShapleyLog:
    """Combine the per-rank logs of one distributed run.

    ``ShapleyLog.load("<run>")`` on a directory with no ``meta.json`` but ``rank*`` sub-logs
    merges them in memory through this function. Records of a merged log are sorted by
    (step, id); merging holds every rank's records in memory.

    Totals (``values``, ``counts``, ``group_values``) add. Per-step statistics are combined
    exactly across ranks (Chan's formula), giving the global per-step standard deviation.
    ``std_values`` are then:

    * recomputed exactly from the per-step records with the global scale when every rank
      recorded its steps and standardized with its own local std (``std_source`` becomes
      ``"merged-global"``);
    * added as they are when every rank was given the global std (``step_std=`` in
      :meth:`ShapleyLogWriter.add_step`);
    * otherwise added as they are, which mixes per-rank standardizations: a warning is issued
      and ``std_source`` becomes ``"merged-per-rank"``.

    Args:
        paths: rank log directories (or loaded logs).
        out_path: when given, the merged log is also written there.
        verify: check checksums while reading.
        progress: tqdm bars while reading.

    Returns:
        The merged :class:`ShapleyLog` (held in memory).

    Raises:
        LogError: no logs, or logs with different ``n_queries`` / ``group_names`` / score.
    """
    logs = [p if isinstance(p, ShapleyLog) else ShapleyLog.load(p, verify=verify, progress=progress) for p in paths]
    if not logs:
        raise LogError("merge: no logs given")
    names = [str(lg.path) for lg in logs]
    _check_same_run(logs, names)
    q, groups = logs[0].n_queries, logs[0].group_names
    totals = IdAccumulator(id_fields(q, len(groups or [])))
    for lg in logs:
        totals.add_table({k: v for k, v in lg.totals().items() if k != "std_sum"})
    stats = combine_step_stats(np.concatenate([lg.step_stats for lg in logs]))
    m2_flat = stats["m2"].reshape(stats.shape[0], -1)
    degenerate = int(np.sum((stats["n"] < 2) | np.any(m2_flat <= 0, axis=1)))

    sources = {lg.header.get("std_source") for lg in logs} - {None}
    records = _merged_records(logs)
    if records is not None and sources <= {"local"}:
        scale = stats["scale"][np.searchsorted(stats["step"], records["step"])]
        totals.add(records["id"], {"std_sum": records["value"] / scale})
        std_source = "merged-global"
    else:
        for lg in logs:
            t = lg.totals()
            totals.add(t["ids"], {"std_sum": t["std_sum"]})
        std_source = "given" if sources == {"given"} else "merged-per-rank"
        if std_source == "merged-per-rank" and len(logs) > 1:
            warnings.warn(
                "merge: std_values add per-rank standardizations (no per-step records to recompute the "
                "global step std); record_steps=True or add_step(step_std=...) avoids this",
                stacklevel=2,
            )
    first: dict[str, Any] = logs[0].header
    header = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": library_version(),
        "created": first.get("created"), "updated": now(), "record_steps": records is not None,
        "metadata": dict(first.get("metadata") or {}), "score": dict(logs[0].score), "n_queries": q,
        "group_names": groups, "last_step": max(lg.last_step for lg in logs),
        "first_step": int(stats["step"][0]) if stats.shape[0] else None, "n_steps": int(stats.shape[0]),
        "std_source": std_source, "degenerate_steps": degenerate, "merged_from": names, "generation": 0,
        "totals": None, "deltas": [], "chunks": [],
    }
    merged = ShapleyLog(totals=totals, group_names=list(groups) if groups else None, steps=records,
                        step_stats=stats, header=header)
    if out_path is not None:
        merged.path = merged.save(out_path)
        merged.header = read_header(merged.path)
    return merged


__all__ = ["merge_logs"]
