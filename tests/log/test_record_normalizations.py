"""Per-step normalizations read from the per-step records (``loss_change``, ``step_z``)."""

from __future__ import annotations

import numpy as np
import pytest

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.log.moments import normalized_record_sums


def _write(tmp_path, n_queries, record_steps=True):
    rng = np.random.default_rng(0)
    steps = []
    with ShapleyLogWriter(tmp_path / "log", n_queries=n_queries, record_steps=record_steps) as w:
        for t in range(1, 6):
            ids = rng.choice(10, size=4, replace=False)
            vals = rng.normal(size=(4,) if n_queries is None else (4, n_queries)) * 10.0 ** (-t)
            w.add_step(t, ids, vals)
            steps.append((t, ids, vals))
    return ShapleyLog.load(tmp_path / "log"), steps


@pytest.mark.parametrize("n_queries", [None, 3])
def test_record_sums_match_reference(tmp_path, n_queries):
    log, steps = _write(tmp_path, n_queries)
    shape = (10,) if n_queries is None else (10, n_queries)
    ref = {k: np.zeros(shape) for k in ("step_std", "loss_change", "step_z")}
    for _, ids, vals in steps:
        mean, std = vals.mean(0), vals.std(0)
        ref["step_std"][ids] += vals / std
        ref["loss_change"][ids] += vals / np.abs(vals.sum(0))
        ref["step_z"][ids] += (vals - mean) / std
    for norm, expected in ref.items():
        np.testing.assert_allclose(log.scores(norm), expected, rtol=1e-10, atol=1e-12)
    # the record-based step_std is the stored std_sum
    ids, sums = normalized_record_sums(log.steps, log.step_stats, "step_std")
    np.testing.assert_allclose(sums, log.std_values[ids], rtol=1e-12)
    if n_queries:
        np.testing.assert_allclose(log.scores("step_z", query=1, ids=[9, 0, 42]),
                                   np.r_[ref["step_z"][[9, 0], 1], 0.0], rtol=1e-10, atol=1e-12)


def test_record_normalizations_need_records(tmp_path):
    log, _ = _write(tmp_path, None, record_steps=False)
    with pytest.raises(ConfigurationError, match="record_steps=True"):
        log.scores("loss_change")
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalized_record_sums(np.zeros(0, dtype=[("step", "i8"), ("id", "i8"), ("value", "f8")]),
                               log.step_stats, "mean")
