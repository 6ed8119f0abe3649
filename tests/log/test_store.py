"""The tracker's in-memory store: the log's accumulator, no per-step records unless asked."""

from __future__ import annotations

import numpy as np
import torch

from inrun_shapley.engine.store import InMemoryValues, merge_across_ranks


def _fill(store, seed=0, steps=5, q=None):
    rng = np.random.default_rng(seed)
    for s in range(1, steps + 1):
        ids = rng.choice(30, size=6, replace=False)
        vals = rng.normal(size=(6,) if q is None else (6, q))
        store.add_step(s, ids, vals, rng.normal(size=(6, 2)) if q is None else None, ["a", "b"])
    return store


def test_no_per_step_records_by_default():
    store = _fill(InMemoryValues())
    assert store.record_steps is False and store.records == []
    step, ids, vals = store.last_record
    assert step == 5 and ids.shape == vals.shape == (6,)
    assert store.step_table()["id"].size == 0
    kept = _fill(InMemoryValues(record_steps=True))
    assert len(kept.records) == 5 and kept.step_table()["id"].size == 30
    np.testing.assert_array_equal(kept.values, store.values)


def test_totals_match_records():
    store = _fill(InMemoryValues(record_steps=True), q=3)
    table = store.step_table()
    ref = np.zeros((table["id"].max() + 1, 3))
    np.add.at(ref, table["id"], table["value"])
    np.testing.assert_allclose(store.values, ref, rtol=1e-12)
    np.testing.assert_array_equal(store.counts, np.bincount(table["id"]))


def test_state_dict_round_trip_and_dense_layout_of_earlier_versions():
    store = _fill(InMemoryValues(record_steps=True))
    state = store.state_dict()
    assert all(isinstance(state[k], torch.Tensor) for k in ("ids", "sum", "count", "group_sum"))
    again = InMemoryValues()
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.values, store.values)
    np.testing.assert_array_equal(again.group_values, store.group_values)
    assert again.group_names == ["a", "b"] and len(again.records) == 5
    dense = {"sum": torch.from_numpy(store.values), "count": torch.from_numpy(store.counts),
             "group_sum": torch.from_numpy(store.group_values), "last_step": 5, "group_names": ["a", "b"],
             "records": []}
    old = InMemoryValues()
    old.load_state_dict(dense)
    np.testing.assert_array_equal(old.ids, store.ids)
    np.testing.assert_array_equal(old.values, store.values)


def test_merged_sums_ranks_and_orders_records():
    a, b = _fill(InMemoryValues(record_steps=True), seed=1), _fill(InMemoryValues(record_steps=True), seed=2)
    merged = InMemoryValues.merged([a, b, InMemoryValues()])
    size = max(a.values.shape[0], b.values.shape[0])
    pad = lambda x: np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])  # noqa: E731
    np.testing.assert_allclose(merged.values, pad(a.values) + pad(b.values), rtol=1e-12)
    np.testing.assert_array_equal(merged.counts, pad(a.counts) + pad(b.counts))
    np.testing.assert_allclose(merged.group_values, pad(a.group_values) + pad(b.group_values), rtol=1e-12)
    assert [r[0] for r in merged.records] == sorted(r[0] for r in a.records + b.records)


def test_merge_across_ranks_is_identity_without_process_group():
    from inrun_shapley import integration

    store = _fill(InMemoryValues())
    assert merge_across_ranks(store) is store
    assert integration.merge_across_ranks is merge_across_ranks
