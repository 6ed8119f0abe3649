"""Flushes write what changed (a delta), stay atomic, and resume without double counting."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from inrun_shapley.log import ShapleyLog, ShapleyLogWriter

from tests.log.helpers import assert_totals_match, make_steps


def test_flush_writes_only_the_touched_ids(tmp_path):
    path = tmp_path / "log"
    w = ShapleyLogWriter(path, flush_every=0)
    w.add_step(1, np.arange(5000), np.linspace(-1, 1, 5000))
    w.flush()
    w.add_step(2, np.array([7, 4999, 12]), np.array([0.5, 0.25, -1.0]))
    w.flush()
    header = json.loads((path / "meta.json").read_text())
    last = header["deltas"][-1]
    assert last["rows"] == 3
    with np.load(io.BytesIO((path / last["file"]).read_bytes())) as z:
        assert z["ids"].tolist() == [7, 12, 4999] and z["count"].tolist() == [1, 1, 1]
    log = ShapleyLog.load(path)  # base + deltas
    assert log.counts[[7, 12, 4999, 8]].tolist() == [2, 2, 2, 1]
    assert log.values[12] == np.linspace(-1, 1, 5000)[12] - 1.0
    w.close()  # folds the deltas into one base
    header = json.loads((path / "meta.json").read_text())
    assert header["deltas"] == [] and header["totals"]["rows"] == 5000
    assert sorted(p.name for p in path.glob("*.npz")) == [header["totals"]["file"]]
    np.testing.assert_array_equal(ShapleyLog.load(path).values, log.values)


def test_deltas_are_compacted_before_they_outgrow_the_base(tmp_path):
    path = tmp_path / "log"
    w = ShapleyLogWriter(path, flush_every=1)
    for step, ids, vals, _ in make_steps(n_steps=30, batch=10, n_ids=40):
        w.add_step(step, ids, vals)
        header = json.loads((path / "meta.json").read_text())
        assert sum(d["rows"] for d in header["deltas"]) <= 40
    on_disk = {p.name for p in path.glob("*.npz")}
    assert on_disk == {e["file"] for e in [header["totals"], *header["deltas"]] if e}  # old ones removed


def _count_replaces(monkeypatch, run):
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(Path(b).name), real(a, b))[1])
    run()
    monkeypatch.setattr(os, "replace", real)
    return calls


def _run(path, steps, crash_at=None, monkeypatch=None):
    """Write ``steps`` (flushing every 3, compacting on close); optionally die at the
    ``crash_at``-th file move. Returns the writer's last committed step."""
    real = os.replace
    count = [0]

    def dying_replace(src, dst):
        count[0] += 1
        if count[0] == crash_at:
            raise KeyboardInterrupt("killed")  # not an OSError: nothing may catch it and go on
        return real(src, dst)

    w = ShapleyLogWriter(path, flush_every=3)
    if crash_at is not None:
        monkeypatch.setattr(os, "replace", dying_replace)
    try:
        for s in steps:
            w.add_step(*s)
        w.close()
    except KeyboardInterrupt:
        pass
    finally:
        monkeypatch.setattr(os, "replace", real) if monkeypatch else None
    return w.flushed_step


def test_kill_at_any_file_move_leaves_a_consistent_prefix(tmp_path, monkeypatch):
    steps = make_steps(n_steps=11, batch=6, n_ids=25, seed=3)
    moves = _count_replaces(monkeypatch, lambda: _run(tmp_path / "count", steps))
    assert any(m.startswith("delta-") for m in moves) and any(m.startswith("totals-") for m in moves)
    for crash_at in range(1, len(moves) + 1):
        path = tmp_path / f"crash{crash_at}"
        committed = _run(path, steps, crash_at, monkeypatch)
        if committed == 0 and not (path / "meta.json").exists():
            continue  # killed before the first commit: nothing to read
        log = ShapleyLog.load(path)
        assert log.last_step == committed
        assert_totals_match(log.totals(), steps[:committed])
        assert log.step_stats["step"].tolist() == list(range(1, committed + 1))
        # restart: replay every step; those already committed are skipped, none counted twice
        with ShapleyLogWriter(path, flush_every=3, resume=True) as w:
            added = [w.add_step(*s) for s in steps]
        assert added == [False] * committed + [True] * (len(steps) - committed)
        final = ShapleyLog.load(path)
        assert_totals_match(final.totals(), steps)
        pairs = list(zip(final.steps["step"].tolist(), final.steps["id"].tolist()))
        assert len(pairs) == len(set(pairs)) == sum(len(ids) for _, ids, _, _ in steps)


def test_failed_compaction_keeps_the_deltas(tmp_path, monkeypatch):
    steps = make_steps(n_steps=4, batch=5, n_ids=200)
    path = tmp_path / "log"
    w = ShapleyLogWriter(path, flush_every=2)
    for s in steps:
        w.add_step(*s)
    real = os.replace

    def failing(src, dst):
        if Path(dst).name.startswith("totals-"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert_totals_match(ShapleyLog.load(path).totals(), steps)  # deltas still listed
    monkeypatch.setattr(os, "replace", real)
    w.close()
    assert json.loads((path / "meta.json").read_text())["deltas"] == []
    assert_totals_match(ShapleyLog.load(path).totals(), steps)
