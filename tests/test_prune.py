"""Tests of pruning: edge cases, ties, unseen ids, class balance, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune, subset

NAN = np.nan


def test_fraction_zero_keeps_all_and_one_drops_all_seen():
    scores = np.array([0.3, -0.2, 0.1, NAN, 0.0])
    assert prune(scores, fraction=0).tolist() == [0, 1, 2, 3, 4]
    assert prune(scores, fraction=1).tolist() == [3]  # the unseen id stays
    assert prune(scores, fraction=1, unseen="drop").tolist() == []


def test_fraction_drops_lowest_rounded():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0])
    assert prune(scores, fraction=0.3).tolist() == [0, 2, 3, 4, 6]  # round(2.1) = 2 dropped
    assert prune(scores, fraction=0.5).tolist() == [0, 2, 6]  # 3.5 rounds up: 4 dropped
    assert prune(scores, fraction=0.29).tolist() == [0, 2, 3, 4, 6]  # round(2.03) = 2


def test_ties_broken_by_id():
    scores = np.array([1.0, 0.0, 0.0, 0.0, 2.0])
    assert prune(scores, fraction=0.4).tolist() == [0, 3, 4]  # among tied ids 1, 2, 3: 1 and 2 go
    assert prune(scores[::-1].copy(), fraction=0.4).tolist() == [0, 3, 4]
    assert prune(scores, keep_top=2).tolist() == [0, 4]
    assert prune(scores, keep_top=3).tolist() == [0, 3, 4]


def test_drop_negative_and_keep_top():
    scores = np.array([0.5, -0.1, 0.2, -0.3, 0.0])
    assert prune(scores, drop_negative=True).tolist() == [0, 2, 4]
    assert prune(scores, drop_negative=True, fraction=0.2).tolist() == [0, 2, 4]
    assert prune(scores, drop_negative=True, fraction=0.6).tolist() == [0, 2]
    assert prune(scores, keep_top=0).tolist() == []
    assert prune(scores, keep_top=10).tolist() == [0, 1, 2, 3, 4]


def test_unseen_ids_and_universe():
    scores = np.array([0.1, NAN, -0.5])
    # without ids the universe is range(len(scores)): ids beyond are not returned
    assert prune(scores, fraction=0.5).tolist() == [0, 1]
    assert prune(scores, fraction=0.5, ids=6).tolist() == [0, 1, 3, 4, 5]
    assert prune(scores, fraction=0.5, ids=6, unseen="drop").tolist() == [0]
    # an explicit id set restricts candidates and output
    assert prune(scores, fraction=0.5, ids=np.array([2, 0, 7])).tolist() == [0, 7]
    assert prune(scores, fraction=1.0, ids=np.array([2, 7])).tolist() == [7]


def test_class_balanced():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 1.1, 1.2, 1.3, 1.4, NAN])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert prune(scores, fraction=0.5).tolist() == [4, 5, 6, 7, 8]
    assert prune(scores, fraction=0.5, labels=labels, class_balanced=True).tolist() == [
        2,
        3,
        6,
        7,
        8,
    ]
    assert prune(scores, keep_top=1, labels=labels, class_balanced=True).tolist() == [3, 7, 8]


def _log(tmp_path):
    """Raw sums favor id 0 (big early step); per-step standardized sums favor id 1."""
    with ShapleyLogWriter(tmp_path / "log") as w:
        w.add_step(1, np.array([0, 1, 2]), np.array([1.0, -1.0, 0.0]))  # std 0.816
        for s in range(2, 6):
            w.add_step(s, np.array([0, 1, 2]), np.array([-0.01, 0.01, 0.0]))  # std 0.00816
    return ShapleyLog.load(tmp_path / "log")


def test_prune_log_uses_normalization(tmp_path):
    log = _log(tmp_path)
    assert log.values[0] > log.values[1] and log.std_values[1] > log.std_values[0]
    assert prune(log, keep_top=1).tolist() == [1]  # step_std by default
    assert prune(log, keep_top=1, normalize="none").tolist() == [0]
    assert prune(log, fraction=1 / 3, ids=5).tolist() == [1, 2, 3, 4]


def test_prune_per_query_log_ranks_by_query_mean(tmp_path):
    with ShapleyLogWriter(tmp_path / "q") as w:
        w.add_step(1, np.array([0, 1, 2]), np.array([[1.0, -3.0], [0.0, 0.0], [-1.0, 4.0]]))
    log = ShapleyLog.load(tmp_path / "q")
    assert prune(log, keep_top=1, normalize="none").tolist() == [2]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"fraction": -0.1},
            ConfigurationError,
            r"fraction must be a number in \[0, 1\], got -0.1",
        ),
        ({"fraction": 1.5}, ConfigurationError, r"fraction must be a number in \[0, 1\], got 1.5"),
        ({"fraction": NAN}, ConfigurationError, "fraction must be a number"),
        ({"fraction": "0.2"}, ConfigurationError, r"got '0.2'"),
        ({"fraction": True}, ConfigurationError, "got True"),
        ({"keep_top": -1}, ConfigurationError, "keep_top must be an int >= 0"),
        ({"keep_top": 2.5}, ConfigurationError, "keep_top must be an int >= 0"),
        ({"fraction": 0.1, "keep_top": 2}, ConfigurationError, "either fraction or keep_top"),
        ({}, ConfigurationError, "nothing to prune"),
        ({"fraction": 0.1, "unseen": "maybe"}, ConfigurationError, "unseen must be one of"),
        ({"fraction": 0.1, "normalize": "zscore"}, ConfigurationError, "normalize must be one of"),
        ({"fraction": 0.1, "class_balanced": True}, ConfigurationError, "needs labels"),
        (
            {"fraction": 0.1, "class_balanced": True, "labels": [0, 1]},
            ConfigurationError,
            "labels has 2 entries",
        ),
        (
            {"drop_negative": True, "class_balanced": True, "labels": [0] * 4},
            ConfigurationError,
            "class_balanced applies",
        ),
        ({"fraction": 0.1, "ids": np.array([1, 1])}, SampleIdError, "duplicates"),
        ({"fraction": 0.1, "ids": np.array([-1, 1])}, SampleIdError, "non-negative"),
        ({"fraction": 0.1, "ids": np.array([0.5])}, SampleIdError, "integer"),
        ({"fraction": 0.1, "ids": -3}, SampleIdError, "count >= 0"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        prune(np.array([0.1, 0.2, NAN, 0.3]), **kwargs)


@pytest.mark.parametrize(
    "scores, match",
    [
        (np.zeros((2, 2)), "1-D numeric array"),
        (np.array(["a", "b"]), "1-D numeric array"),
        (np.array([0.1, np.inf]), "contain inf"),
    ],
)
def test_bad_scores(scores, match):
    with pytest.raises(ConfigurationError, match=match):
        prune(scores, fraction=0.5)


def test_subset():
    torch = pytest.importorskip("torch")
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    keep = prune(np.arange(10.0), fraction=0.3)
    sub = subset(data, keep)
    assert isinstance(sub, torch.utils.data.Subset)
    assert len(sub) == 7 and [float(sub[i][0]) for i in range(7)] == [3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(SampleIdError, match=r"in \[0, 10\)"):
        subset(data, [3, 10])
    assert len(subset(data, [])) == 0


def test_ids_count_below_the_largest_scored_id_refused(tmp_path):
    log = _log(tmp_path)  # ids 0, 1, 2
    with pytest.raises(SampleIdError, match=r"ids=2 means the dataset has ids \[0, 2\).*up to 2"):
        prune(log, fraction=0.5, ids=2)
    assert prune(log, fraction=0.0, ids=3).tolist() == [0, 1, 2]
    with pytest.raises(SampleIdError, match="up to 3"):
        prune(np.array([0.1, NAN, 0.2, 0.3, NAN]), fraction=0.5, ids=3)
    assert prune(np.array([0.1, NAN, 0.2, 0.3, NAN]), fraction=0.0, ids=4).tolist() == [0, 1, 2, 3]
