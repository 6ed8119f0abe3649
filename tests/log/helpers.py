"""Shared oracle for the value-log tests: synthetic steps and totals from the definition."""

from __future__ import annotations

import numpy as np

from inrun_shapley.log import ShapleyLog, ShapleyLogWriter


def make_steps(n_steps=12, batch=7, n_ids=40, seed=0, id_of=None):
    """Synthetic ``(step, ids, values, None)`` steps; ``id_of`` maps 0..n_ids-1 to the logged ids."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_steps):
        ids = rng.choice(n_ids, size=batch, replace=False).astype(np.int64)
        if id_of is not None:
            ids = np.asarray(id_of, dtype=np.int64)[ids]
        out.append((k + 1, ids, rng.normal(size=batch) / (k + 1), None))
    return out


def reference_table(steps):
    """``{id: (value_sum, count, std_sum)}`` computed directly from the definition."""
    out: dict[int, list] = {}
    for _, ids, vals, _ in steps:
        s = vals.std() if vals.shape[0] > 1 else 1.0
        s = s if s > 0 else 1.0
        for i, v in zip(ids.tolist(), vals.tolist()):
            row = out.setdefault(i, [0.0, 0, 0.0])
            row[0] += v
            row[1] += 1
            row[2] += v / s
    return out


def assert_totals_match(totals: dict, steps) -> None:
    ref = reference_table(steps)
    ids = sorted(ref)
    assert totals["ids"].tolist() == ids
    np.testing.assert_allclose(totals["value_sum"], [ref[i][0] for i in ids], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(totals["count"], [ref[i][1] for i in ids])
    np.testing.assert_allclose(totals["std_sum"], [ref[i][2] for i in ids], rtol=1e-10, atol=1e-13)


def write(path, steps, **kw):
    with ShapleyLogWriter(path, **kw) as w:
        for step, ids, vals, g in steps:
            w.add_step(step, ids, vals, g)
    return ShapleyLog.load(path)


def crash(writer) -> None:
    """What a killed process leaves: the writer's flock freed by the kernel, its lock file (with
    the dead holder's identity) and its unflushed steps left behind; the object is unusable."""
    import os

    lock = writer._lock
    if lock is not None and lock._fd is not None:
        os.close(lock._fd)
        lock._fd = None
    writer._closed = True
