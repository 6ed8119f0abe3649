"""Tests of the on-disk value log: round trips, crash safety, resume, merge, corruption."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from inrun_shapley.errors import ConfigurationError, LogError, NonFiniteError, SampleIdError
from inrun_shapley.log import (
    FORMAT_VERSION,
    ShapleyLog,
    ShapleyLogWriter,
    combine_moments,
    merge_logs,
    step_moments,
)
from tests.log.helpers import crash

GROUPS = ["attn", "mlp", "embed"]


# --------------------------------------------------------------------------------------------
# oracle
# --------------------------------------------------------------------------------------------


def make_steps(n_steps=12, batch=7, n_ids=40, q=None, groups=0, seed=0, start=1):
    """Synthetic per-step (step, ids, values, group_values) with decaying magnitudes."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_steps):
        step = start + k
        ids = rng.choice(n_ids, size=batch, replace=False).astype(np.int64)
        if groups:
            g = rng.normal(size=(batch, groups)) / step
            out.append((step, ids, g.sum(axis=1), g))
        else:
            shape = (batch,) if q is None else (batch, q)
            out.append((step, ids, rng.normal(size=shape) / step, None))
    return out


def reference(steps, size=None):
    """Totals computed directly from the definition (population std, 1 when degenerate)."""
    size = size or max(int(ids.max()) for _, ids, _, _ in steps) + 1
    vshape = steps[0][2].shape[1:]
    value = np.zeros((size,) + vshape)
    std = np.zeros((size,) + vshape)
    count = np.zeros(size, np.int64)
    group = None
    if steps[0][3] is not None:
        group = np.zeros((size, steps[0][3].shape[1]))
    for _, ids, vals, g in steps:
        s = vals.std(axis=0) if vals.shape[0] > 1 else np.ones(vshape)
        s = np.where(s > 0, s, 1.0)
        value[ids] += vals
        std[ids] += vals / s
        count[ids] += 1
        if group is not None:
            group[ids] += g
    return value, count, std, group


def write(path, steps, **kw):
    with ShapleyLogWriter(path, **kw) as w:
        for step, ids, vals, g in steps:
            w.add_step(step, ids, vals, g)
    return ShapleyLog.load(path)


def assert_log_matches(log, steps):
    value, count, std, group = reference(steps, size=log.counts.shape[0])
    np.testing.assert_allclose(log.values, value, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(log.counts, count)
    np.testing.assert_allclose(log.std_values, std, rtol=1e-10, atol=1e-13)
    if group is not None:
        np.testing.assert_allclose(log.group_values, group, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(log.seen, count > 0)
    np.testing.assert_array_equal(log.ids, np.flatnonzero(count > 0))
    assert log.last_step == steps[-1][0]


def records_of(steps):
    rows = []
    for step, ids, vals, g in steps:
        for j in np.argsort(ids):
            rows.append((step, ids[j], vals[j]))
    return rows


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------


def test_round_trip_1d_with_groups(tmp_path):
    steps = make_steps(groups=len(GROUPS))
    log = write(tmp_path / "log", steps, group_names=GROUPS, flush_every=5, metadata={"seed": 3})
    assert_log_matches(log, steps)
    assert log.n_queries is None
    assert log.group_names == GROUPS
    assert log.metadata == {"seed": 3}
    assert log.header["format_version"] == FORMAT_VERSION
    # records: one row per (step, id), in step order, values and group values intact
    assert log.steps.shape[0] == sum(len(ids) for _, ids, _, _ in steps)
    for step, ids, vals, g in steps:
        rows = log.steps[log.steps["step"] == step]
        order = np.argsort(ids)
        np.testing.assert_array_equal(np.sort(rows["id"]), ids[order])
        by_id = dict(zip(rows["id"].tolist(), range(rows.shape[0])))
        for j, i in enumerate(ids):
            assert rows["value"][by_id[int(i)]] == vals[j]
            np.testing.assert_array_equal(rows["group_value"][by_id[int(i)]], g[j])
    np.testing.assert_array_equal(log.step_stats["step"], [s for s, *_ in steps])
    steps_axis, totals = log.step_totals()
    np.testing.assert_allclose(totals, [v.sum() for _, _, v, _ in steps], rtol=1e-12)
    df = log.to_pandas()
    assert list(df.columns) == [
        "id",
        "value",
        "count",
        "std_value",
        "group_attn",
        "group_mlp",
        "group_embed",
    ]
    assert len(df) == log.ids.size
    np.testing.assert_allclose(df["group_attn"] + df["group_mlp"] + df["group_embed"], df["value"])


def test_round_trip_per_query(tmp_path):
    steps = make_steps(q=3, seed=1)
    log = write(tmp_path / "log", steps, n_queries=3, flush_every=4)
    assert_log_matches(log, steps)
    assert log.n_queries == 3 and log.values.shape == (log.counts.shape[0], 3)
    assert log.steps["value"].shape == (log.steps.shape[0], 3)
    # per-query ranking
    ids, vals = log.top(1, 4, normalize="none")
    col = log.values[log.ids, 1]
    np.testing.assert_allclose(vals, np.sort(col)[::-1][:4])
    np.testing.assert_allclose(log.values[ids, 1], vals)
    low_ids, low_vals = log.top("mean", 2, normalize="step_std", largest=False)
    np.testing.assert_allclose(low_vals, np.sort(log.std_values[log.ids].mean(axis=1))[:2])
    np.testing.assert_allclose(log.std_values[low_ids].mean(axis=1), low_vals)
    assert log.scores("none").shape == (log.counts.shape[0], 3)
    assert log.scores("none", query=2).shape == (log.counts.shape[0],)
    np.testing.assert_allclose(log.scores("none", "mean"), log.values.mean(axis=1))
    df = log.to_pandas()
    assert {"value_q0", "value_q2", "std_value_q1", "count", "std_value"} <= set(df.columns)
    with pytest.raises(ConfigurationError, match="query="):
        log.top(None, 3)
    with pytest.raises(ConfigurationError, match="query must be"):
        log.scores("none", query=3)


def test_n_queries_inferred_from_first_step(tmp_path):
    steps = make_steps(q=2, n_steps=3)
    log = write(tmp_path / "log", steps)
    assert log.n_queries == 2
    assert_log_matches(log, steps)


def test_scores_normalizations(tmp_path):
    steps = make_steps()
    log = write(tmp_path / "log", steps)
    np.testing.assert_array_equal(log.scores("none"), log.values)
    np.testing.assert_array_equal(log.scores("step_std"), log.std_values)
    np.testing.assert_allclose(log.scores("mean"), log.values / np.maximum(log.counts, 1))
    with pytest.raises(ConfigurationError, match="normalize must be one of"):
        log.scores("zscore")


def test_degenerate_steps_divide_by_one(tmp_path):
    steps = [
        (1, np.array([0, 1, 2]), np.array([0.3, -0.1, 0.2]), None),
        (2, np.array([3]), np.array([0.5]), None),  # one sample: scale 1
        (3, np.array([1, 4]), np.array([0.25, 0.25]), None),  # std 0: scale 1
    ]
    log = write(tmp_path / "log", steps)
    assert_log_matches(log, steps)
    assert log.std_values[3] == 0.5
    assert log.header["degenerate_steps"] == 2
    np.testing.assert_array_equal(log.step_stats["scale"], [np.std([0.3, -0.1, 0.2]), 1.0, 1.0])


def test_ids_sparse_and_large(tmp_path):
    steps = [(1, np.array([5, 1_000_003]), np.array([1.0, -2.0]), None)]
    log = write(tmp_path / "log", steps)
    assert log.values.shape == (1_000_004,)
    assert log.ids.tolist() == [5, 1_000_003]
    assert log.values[1_000_003] == -2.0 and log.values[6] == 0.0


def test_empty_log_round_trip(tmp_path):
    ShapleyLogWriter(tmp_path / "log").close()
    log = ShapleyLog.load(tmp_path / "log")
    assert log.ids.size == 0 and log.last_step == 0 and log.values.shape == (0,)


def test_record_steps_false(tmp_path):
    steps = make_steps()
    log = write(tmp_path / "log", steps, record_steps=False)
    assert log.steps is None
    assert not list((tmp_path / "log").glob("steps-*"))
    assert_log_matches(log, steps)


def test_chunks_appended_per_flush(tmp_path):
    steps = make_steps(n_steps=10)
    write(tmp_path / "log", steps, flush_every=3)
    chunks = sorted(p.name for p in (tmp_path / "log").glob("steps-*.npy"))
    assert len(chunks) == 4  # 3 + 3 + 3 + 1
    assert len(list((tmp_path / "log").glob("totals-*.npz"))) == 1  # old generations removed
    header = json.loads((tmp_path / "log" / "meta.json").read_text())
    assert [c["n_steps"] for c in header["chunks"]] == [3, 3, 3, 1]


def test_torch_inputs_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    with ShapleyLogWriter(tmp_path / "log") as w:
        w.add_step(1, torch.tensor([2, 0]), torch.tensor([0.5, -0.5], dtype=torch.float32))
    log = ShapleyLog.load(tmp_path / "log")
    assert log.values.tolist() == [-0.5, 0.0, 0.5]


# --------------------------------------------------------------------------------------------
# add_step validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, values, group_values, error, match",
    [
        ([1, 1], [0.1, 0.2], None, SampleIdError, "duplicated"),
        ([-1, 2], [0.1, 0.2], None, SampleIdError, r"non-negative int64 ids in \[0, 2\*\*63\)"),
        ([1.0, 2.0], [0.1, 0.2], None, SampleIdError, "integers"),
        ([[1, 2]], [0.1, 0.2], None, SampleIdError, "1-D"),
        ([1, 2], [0.1, 0.2, 0.3], None, ConfigurationError, r"values must be \[n\]"),
        ([1, 2], [[0.1], [0.2]], None, ConfigurationError, r"log expects \[n\]"),
        ([1, 2], [0.1, np.nan], None, NonFiniteError, "NaN"),
        ([1, 2], [0.1, 0.2], [[0.1], [0.2]], ConfigurationError, "no group_names"),
    ],
)
def test_add_step_bad_inputs(tmp_path, ids, values, group_values, error, match):
    with ShapleyLogWriter(tmp_path / "log", flush_every=0) as w:
        w.add_step(1, np.array([0]), np.array([0.0]))
        with pytest.raises(error, match=match):
            w.add_step(2, np.array(ids), np.array(values), group_values)


def test_add_step_order_and_closed(tmp_path):
    w = ShapleyLogWriter(tmp_path / "log")
    w.add_step(3, np.array([0]), np.array([0.1]))
    with pytest.raises(ConfigurationError, match="steps must increase"):
        w.add_step(3, np.array([1]), np.array([0.1]))
    w.close()
    with pytest.raises(LogError, match="closed"):
        w.add_step(4, np.array([1]), np.array([0.1]))


def test_groups_required_once_declared(tmp_path):
    with ShapleyLogWriter(tmp_path / "log", group_names=["a", "b"]) as w:
        with pytest.raises(ConfigurationError, match="pass group_values"):
            w.add_step(1, np.array([0]), np.array([0.1]))
        with pytest.raises(ConfigurationError, match=r"group_values must be \[1, 2\]"):
            w.add_step(1, np.array([0]), np.array([0.1]), np.array([[0.1]]))
        with pytest.warns(UserWarning, match="do not sum"):
            w.add_step(1, np.array([0]), np.array([0.1]), np.array([[0.1, 0.5]]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_queries": 0}, "n_queries must be"),
        ({"n_queries": True}, "n_queries must be"),
        ({"flush_every": -1}, "flush_every must be"),
        ({"group_names": ["a", "a"]}, "unique"),
        ({"metadata": {"x": object()}}, "JSON-serializable"),
    ],
)
def test_writer_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        ShapleyLogWriter(tmp_path / "log", **kwargs)


# --------------------------------------------------------------------------------------------
# crash safety
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    # "-000002.npz": the flush's per-id file, a delta or (here) a compaction into a new base
    "failing_file", ["meta.json", "stats-000002.npy", "-000002.npz", "steps-000002.npy"]
)
def test_interrupted_flush_keeps_last_complete_flush(tmp_path, monkeypatch, failing_file):
    steps = make_steps(n_steps=8, groups=3)
    path = tmp_path / "log"
    w = ShapleyLogWriter(path, group_names=GROUPS, flush_every=4)
    for s in steps[:4]:
        w.add_step(*s)
    assert w.flushed_step == 4

    real_replace = os.replace

    def crashing_replace(src, dst):
        if Path(dst).name.endswith(failing_file):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    for s in steps[4:7]:
        w.add_step(*s)
    with pytest.raises(OSError, match="simulated crash"):
        w.add_step(*steps[7])  # triggers the flush
    assert w.flushed_step == 4
    # a torn temp file as left by a kill during write
    (path / ".meta.json.999.tmp").write_bytes(b'{"format": "inrun-sh')
    log = ShapleyLog.load(path)
    assert_log_matches(log, steps[:4])
    assert log.steps["step"].max() == 4

    # the writer kept its pending steps: once the disk works again, a retry commits all of them
    monkeypatch.setattr(os, "replace", real_replace)
    w.close()
    assert_log_matches(ShapleyLog.load(path), steps)


def test_killed_run_keeps_everything_up_to_last_flush(tmp_path):
    steps = make_steps(n_steps=10)
    path = tmp_path / "log"
    w = ShapleyLogWriter(path, flush_every=3)
    for s in steps:
        w.add_step(*s)
    # no close(): the process dies; steps 10 was never flushed
    (path / "steps-000099.npy").write_bytes(b"\x93NUMPY garbage")  # uncommitted chunk
    log = ShapleyLog.load(path)
    assert log.last_step == 9
    assert_log_matches(log, steps[:9])
    del w


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------


def test_resume_no_double_counting(tmp_path):
    steps = make_steps(n_steps=15, groups=3, seed=4)
    path = tmp_path / "log"
    w = ShapleyLogWriter(path, group_names=GROUPS, flush_every=3, metadata={"run": 1})
    for s in steps[:10]:
        w.add_step(*s)  # flushed through step 9; step 10 lost with the "crash"
    crash(w)
    (path / "stats-000004.npy").write_bytes(b"torn")  # leftover of the interrupted flush

    with pytest.raises(LogError, match="resume=True"):
        ShapleyLogWriter(path, group_names=GROUPS)

    w2 = ShapleyLogWriter(
        path, group_names=GROUPS, flush_every=3, resume=True, metadata={"resumed": True}
    )
    assert w2.last_step == 9 and w2.state_dict()["flushed_step"] == 9
    assert not (path / "stats-000004.npy").exists()  # strays cleaned on resume
    # the restarted training replays from an older checkpoint (step 6)
    added = [w2.add_step(*s) for s in steps[5:]]
    assert added == [False] * 4 + [True] * 6
    w2.close()
    log = ShapleyLog.load(path)
    assert_log_matches(log, steps)
    assert log.metadata == {"run": 1, "resumed": True}
    pairs = list(zip(log.steps["step"].tolist(), log.steps["id"].tolist()))
    assert len(pairs) == len(set(pairs)) == sum(len(ids) for _, ids, _, _ in steps)


def test_resume_gap_warns(tmp_path):
    steps = make_steps(n_steps=6)
    path = tmp_path / "log"
    write(path, steps[:3])
    with ShapleyLogWriter(path, resume=True) as w:
        with pytest.warns(UserWarning, match="missing from the log"):
            w.add_step(*steps[4])


def test_resume_on_missing_log_starts_new(tmp_path):
    steps = make_steps(n_steps=2)
    log = write(tmp_path / "new", steps, resume=True)
    assert_log_matches(log, steps)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_queries": 2}, "n_queries"),
        ({"record_steps": False}, "record_steps"),
        ({"group_names": ["x"]}, "group_names"),
    ],
)
def test_resume_incompatible(tmp_path, kwargs, match):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=2, groups=3), group_names=GROUPS)
    with pytest.raises(LogError, match=match):
        ShapleyLogWriter(path, resume=True, **kwargs)


def test_resume_adding_groups_refused(tmp_path):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=2))
    with pytest.raises(LogError, match="group_names=None, resumed with"):
        ShapleyLogWriter(path, resume=True, group_names=["a"])


def test_non_log_directory_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(LogError, match="not empty"):
        ShapleyLogWriter(tmp_path / "d")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LogError, match="is a file"):
        ShapleyLogWriter(tmp_path / "f")


# --------------------------------------------------------------------------------------------
# merge across ranks
# --------------------------------------------------------------------------------------------


def split_ranks(steps, world=2, seed=0):
    """Deal each step's samples to ranks (disjoint ids within a step)."""
    rng = np.random.default_rng(seed)
    ranks = [[] for _ in range(world)]
    for step, ids, vals, g in steps:
        owner = rng.integers(0, world, size=ids.shape[0])
        owner[:world] = np.arange(world)  # every rank gets at least one sample
        for r in range(world):
            m = owner == r
            ranks[r].append((step, ids[m], vals[m], None if g is None else g[m]))
    return ranks


@pytest.mark.parametrize("q, groups", [(None, 3), (2, 0)])
def test_merge_two_ranks_equals_single_log(tmp_path, q, groups):
    steps = make_steps(n_steps=9, batch=8, q=q, groups=groups, seed=7)
    kw = {"group_names": GROUPS} if groups else {"n_queries": q}
    single = write(tmp_path / "single", steps, **kw)
    rank_steps = split_ranks(steps)
    for r, rs in enumerate(rank_steps):
        write(tmp_path / "run" / f"rank{r}", rs, flush_every=4, **kw)
    # per-rank standardization differs from the global one...
    r0 = ShapleyLog.load(tmp_path / "run" / "rank0")
    assert not np.allclose(r0.std_values[r0.ids], single.std_values[r0.ids])

    merged = ShapleyLog.merge(
        [tmp_path / "run" / "rank0", tmp_path / "run" / "rank1"], tmp_path / "merged"
    )
    for lg in (merged, ShapleyLog.load(tmp_path / "merged"), ShapleyLog.load(tmp_path / "run")):
        np.testing.assert_allclose(lg.values, single.values, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(lg.counts, single.counts)
        np.testing.assert_allclose(lg.std_values, single.std_values, rtol=1e-9, atol=1e-12)
        if groups:
            np.testing.assert_allclose(lg.group_values, single.group_values, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(lg.steps["step"], single.steps["step"])
        np.testing.assert_array_equal(lg.steps["id"], single.steps["id"])
        np.testing.assert_array_equal(lg.steps["value"], single.steps["value"])
        np.testing.assert_array_equal(lg.step_stats["n"], single.step_stats["n"])
        np.testing.assert_allclose(lg.step_stats["scale"], single.step_stats["scale"], rtol=1e-12)
        assert lg.header["std_source"] == "merged-global"
        assert lg.last_step == single.last_step
    assert merged.header["merged_from"][0].endswith("rank0")


def test_merge_with_given_global_std(tmp_path):
    steps = make_steps(n_steps=6, batch=8, seed=2)
    single = write(tmp_path / "single", steps)
    paths = []
    for r, rs in enumerate(split_ranks(steps, seed=1)):
        path = tmp_path / f"rank{r}"
        with ShapleyLogWriter(path, record_steps=False) as w:
            for (step, ids, vals, _), (_, _, full, _) in zip(rs, steps):
                w.add_step(step, ids, vals, step_std=full.std())  # as if all-reduced
        paths.append(path)
    merged = merge_logs(paths)
    assert merged.header["std_source"] == "given"
    np.testing.assert_allclose(merged.std_values, single.std_values, rtol=1e-10)


def test_merge_without_records_warns_per_rank(tmp_path):
    steps = make_steps(n_steps=4, batch=8)
    paths = []
    for r, rs in enumerate(split_ranks(steps)):
        write(tmp_path / f"rank{r}", rs, record_steps=False)
        paths.append(tmp_path / f"rank{r}")
    with pytest.warns(UserWarning, match="per-rank standardizations"):
        merged = ShapleyLog.merge(paths)
    assert merged.header["std_source"] == "merged-per-rank"
    assert merged.steps is None
    single = reference(steps)
    np.testing.assert_allclose(merged.values[: single[0].shape[0]], single[0], rtol=1e-12)


def test_merge_incompatible(tmp_path):
    write(tmp_path / "a", make_steps(n_steps=2))
    write(tmp_path / "b", make_steps(n_steps=2, q=2))
    with pytest.raises(LogError, match="not the same run"):
        ShapleyLog.merge([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(LogError, match="no logs"):
        ShapleyLog.merge([])


def test_moments_combine_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)) * 1e-4 + 5.0  # large mean, tiny spread
    parts = [x[:5], x[5:6], x[6:]]
    moments = [step_moments(p) for p in parts]
    n, mean, m2 = combine_moments(
        np.array([m[0] for m in moments]),
        np.stack([m[1] for m in moments]),
        np.stack([m[2] for m in moments]),
    )
    assert n == 20
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(np.sqrt(m2 / n), x.std(axis=0), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------------------------


def _corrupt_meta_json(path):
    (path / "meta.json").write_text('{"format": "inrun-shapley-log", "chunks": [')


def _meta_not_a_log(path):
    (path / "meta.json").write_text('{"hello": 1}')


def _future_version(path):
    header = json.loads((path / "meta.json").read_text())
    header["format_version"] = FORMAT_VERSION + 1
    (path / "meta.json").write_text(json.dumps(header))


def _truncate_chunk(path):
    f = path / "steps-000001.npy"
    f.write_bytes(f.read_bytes()[:-10])


def _flip_byte(path):
    f = path / "stats-000001.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete_totals(path):
    next(path.glob("totals-*.npz")).unlink()


def _wrong_rows(path):
    header = json.loads((path / "meta.json").read_text())
    header["chunks"][0]["stats"]["rows"] += 1
    (path / "meta.json").write_text(json.dumps(header))


def _remove_meta(path):
    (path / "meta.json").unlink()


@pytest.mark.parametrize(
    "damage, match",
    [
        (_corrupt_meta_json, r"meta\.json: unreadable header"),
        (_meta_not_a_log, "not an inrun-shapley log"),
        (_future_version, f"format_version {FORMAT_VERSION + 1} is not supported"),
        (_truncate_chunk, r"steps-000001\.npy: truncated"),
        (_flip_byte, r"stats-000001\.npy: checksum mismatch"),
        (_delete_totals, r"totals-000002\.npz: file listed in meta\.json is missing"),
        (_wrong_rows, r"stats-000001\.npy: stats chunk has \(3,\) rows, 4 recorded"),
        (_remove_meta, r"meta\.json: missing"),
    ],
)
def test_corrupt_log_raises(tmp_path, damage, match):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=5), flush_every=3)
    damage(path)
    with pytest.raises(LogError, match=match):
        ShapleyLog.load(path)


def test_mismatching_chunk_dtype(tmp_path):
    """A well-formed chunk from another log (per-query) in place of this log's chunk."""
    path, q_path = tmp_path / "log", tmp_path / "q"
    write(path, make_steps(n_steps=6), flush_every=3)
    write(q_path, make_steps(n_steps=3, q=2))
    (path / "stats-000001.npy").write_bytes((q_path / "stats-000001.npy").read_bytes())
    header = json.loads((path / "meta.json").read_text())
    size = (path / "stats-000001.npy").stat().st_size
    header["chunks"][0]["stats"].update(bytes=size, rows=3)
    (path / "meta.json").write_text(json.dumps(header))
    with pytest.raises(LogError, match="checksum mismatch"):
        ShapleyLog.load(path)
    with pytest.raises(LogError, match=r"stats-000001\.npy: stats chunk has dtype"):
        ShapleyLog.load(path, verify=False)


def test_missing_path(tmp_path):
    with pytest.raises(LogError, match="no such value log"):
        ShapleyLog.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogError, match="is a directory, found a file"):
        ShapleyLog.load(tmp_path / "file")


def test_save_refuses_existing(tmp_path):
    log = write(tmp_path / "log", make_steps(n_steps=2))
    with pytest.raises(LogError, match="not an empty directory"):
        log.save(tmp_path / "log")
    copy = ShapleyLog.load(log.save(tmp_path / "copy"))
    np.testing.assert_array_equal(copy.values, log.values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShapleyLog.merge([tmp_path / "copy"])
