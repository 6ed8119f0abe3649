"""Sparse sample ids (hashes, global row numbers): memory per seen id, dense views refused."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.errors import SampleIdError
from inrun_shapley.log import IdAccumulator, ShapleyLog, ShapleyLogWriter
from inrun_shapley.log.accumulator import check_ids
from inrun_shapley.log.fields import id_fields
from inrun_shapley.pruning import prune

from tests.log.helpers import assert_totals_match, make_steps, reference_table, write

HUGE = np.array([3, 10**8, 2**40 + 7, 2**62, 5 * 10**17], dtype=np.int64)


def test_accumulator_matches_a_dict_oracle():
    """Random sparse ids over many adds, enough new ids to merge the index tail many times."""
    rng = np.random.default_rng(0)
    universe = np.unique(rng.integers(0, 2**62, size=30_000))
    acc = IdAccumulator(id_fields(2, 3, standardized=False))
    ref: dict[int, list] = {}
    for _ in range(60):
        ids = rng.choice(universe, size=int(rng.integers(1, 900)))  # duplicates within an add too
        vals, groups = rng.normal(size=(ids.size, 2)), rng.normal(size=(ids.size, 3))
        acc.add(ids, {"value_sum": vals, "count": 1, "group_sum": groups})
        for i, v, g in zip(ids.tolist(), vals, groups):
            row = ref.setdefault(i, [np.zeros(2), 0, np.zeros(3)])
            row[0] = row[0] + v
            row[1] += 1
            row[2] = row[2] + g
    table = acc.table()
    keys = sorted(ref)
    assert table["ids"].tolist() == keys and len(acc) == len(keys) and acc.max_id == keys[-1]
    np.testing.assert_allclose(table["value_sum"], [ref[i][0] for i in keys], rtol=1e-12)
    np.testing.assert_array_equal(table["count"], [ref[i][1] for i in keys])
    np.testing.assert_allclose(table["group_sum"], [ref[i][2] for i in keys], rtol=1e-12)
    probe = np.array([keys[5], 1, keys[-1], keys[5]])
    np.testing.assert_array_equal(acc.lookup("count", probe), [ref[keys[5]][1], 0, ref[keys[-1]][1], ref[keys[5]][1]])


@pytest.mark.parametrize(
    "ids, match",
    [
        (np.array([-1, 2]), "non-negative"),
        (np.array([2**63], dtype=np.uint64), r"below 2\*\*63.*9223372036854775808"),
        (np.array([1.0]), "integers"),
        (np.array([[1]]), "1-D"),
    ],
)
def test_bad_ids(ids, match):
    with pytest.raises(SampleIdError, match=match):
        check_ids(ids)


def test_log_with_huge_ids_stays_small(tmp_path):
    steps = make_steps(n_steps=10, batch=3, n_ids=HUGE.size, id_of=HUGE)
    tracemalloc.start()
    try:
        log = write(tmp_path / "log", steps, flush_every=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # a dense layout would need 8 bytes x 5e17 ids
    assert_totals_match(log.totals(), steps)
    assert log.max_id == int(HUGE.max()) and log.ids.tolist() == sorted(reference_table(steps))
    with pytest.raises(SampleIdError, match=r"ids are sparse.*totals\(\)"):
        log.values
    ref = reference_table(steps)
    np.testing.assert_allclose(log.scores("none", ids=HUGE), [ref.get(i, [0.0])[0] for i in HUGE.tolist()])
    top_ids, _ = log.top(k=2, normalize="none")
    assert top_ids.tolist() == sorted(ref, key=lambda i: -ref[i][0])[:2]
    # pruning: the default universe range(max_id + 1) is refused, an explicit one works
    with pytest.raises(SampleIdError, match="sparse ids"):
        prune(log, fraction=0.5)
    kept = prune(log, keep_top=2, normalize="none", unseen="drop")
    assert kept.tolist() == sorted(top_ids.tolist())
    kept = prune(log, keep_top=2, normalize="none", ids=np.array([11, *HUGE]))
    assert kept.tolist() == sorted([11, *top_ids.tolist()])
    # resume keeps the sparse totals
    more = make_steps(n_steps=3, batch=2, n_ids=HUGE.size, id_of=HUGE, seed=5)
    more = [(s + 10, i, v, g) for s, i, v, g in more]
    with ShapleyLogWriter(tmp_path / "log", resume=True) as w:
        for s in more:
            w.add_step(*s)
    assert_totals_match(ShapleyLog.load(tmp_path / "log").totals(), steps + more)


def test_store_with_huge_ids(tmp_path):
    store = InMemoryValues()
    store.add_step(1, HUGE[:3], np.array([0.5, -1.0, 2.0]))
    store.add_step(2, HUGE[1:4], np.array([1.0, 1.0, 1.0]))
    t = store.totals()
    assert t["ids"].tolist() == HUGE[:4].tolist()
    np.testing.assert_array_equal(t["value_sum"], [0.5, 0.0, 3.0, 1.0])
    np.testing.assert_array_equal(t["count"], [1, 2, 2, 1])
    with pytest.raises(SampleIdError, match="ids are sparse"):
        store.values
    again = InMemoryValues()
    again.load_state_dict(store.state_dict())
    np.testing.assert_array_equal(again.totals()["value_sum"], t["value_sum"])


def test_dense_views_kept_for_dataset_indices(tmp_path):
    log = write(tmp_path / "log", [(1, np.array([5, 1_000_003]), np.array([1.0, -2.0]), None)])
    assert log.values.shape == (1_000_004,) and log.values[1_000_003] == -2.0
