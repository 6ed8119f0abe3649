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


# -- class skew: a plan that thins or empties a class is reported when labels are known ------

def _clean_like_scores():
    """30 samples of 3 classes; the lowest scores all sit in class 0 (as on a clean dataset,
    where the easiest samples cluster in a few classes)."""
    labels = np.repeat([0, 1, 2], 10)
    scores = np.concatenate([np.linspace(-1.0, -0.1, 10), np.linspace(0.1, 1.0, 10), np.linspace(0.2, 1.1, 10)])
    return scores, labels


def test_skewed_plan_warns_naming_classes_and_balance_option():
    from inrun_shapley.pruning import ClassSkewWarning

    scores, labels = _clean_like_scores()
    with pytest.warns(ClassSkewWarning) as caught:
        keep = prune(scores, fraction=1 / 3, labels=labels)
    assert not np.isin(np.arange(10), keep).any()  # the plan drops all of class 0
    (w,) = caught
    text = str(w.message)
    assert "class 0: 10 of 10 (emptied)" in text and "class 1" not in text and "class 2" not in text
    assert "10 of 30 scored samples (33.3%)" in text and "class_balanced=True" in text


def test_thinned_class_warns_without_being_emptied():
    from inrun_shapley.pruning import ClassSkewWarning

    scores, labels = _clean_like_scores()
    with pytest.warns(ClassSkewWarning, match=r"class 0: 6 of 10: pass class_balanced=True"):
        prune(scores, fraction=0.2, labels=labels)  # 6 of 30 overall (20%), 60% of class 0


def test_no_warning_when_balanced_without_labels_or_when_even(recwarn):
    scores, labels = _clean_like_scores()
    keep = prune(scores, fraction=1 / 3, labels=labels, class_balanced=True)
    assert [int(np.isin(np.flatnonzero(labels == c), keep).sum()) for c in range(3)] == [7, 7, 7]
    prune(scores, fraction=1 / 3)  # same skewed plan, labels unknown: nothing said
    even = np.tile([0.5, -0.5, 0.1], 10)  # every class loses the same share
    prune(np.arange(30, dtype=float), fraction=0.5, labels=np.arange(30) % 3)
    prune(even, fraction=0.3, labels=np.arange(30) // 10)
    prune(scores, fraction=0.0, labels=labels)  # nothing dropped
    assert [str(w.message) for w in recwarn] == []


def test_unseen_ids_kept_keep_a_class_from_being_emptied():
    from inrun_shapley.pruning import ClassSkewWarning

    scores, labels = _clean_like_scores()
    scores[0] = NAN  # id 0 (class 0) never seen: kept by default
    with pytest.warns(ClassSkewWarning) as caught:
        prune(scores, fraction=0.35, labels=labels)
    assert "class 0: 9 of 9:" in str(caught[0].message) and "emptied" not in str(caught[0].message)
    with pytest.warns(ClassSkewWarning, match=r"class 0: 9 of 9 \(emptied\)"):
        prune(scores, fraction=0.35, labels=labels, unseen="drop")


def test_drop_negative_with_balance_warns_about_drop_negative():
    from inrun_shapley.pruning import ClassSkewWarning

    scores, labels = _clean_like_scores()
    with pytest.warns(ClassSkewWarning, match="drop_negative=True drops every harmful sample"):
        prune(scores, fraction=0.1, drop_negative=True, labels=labels, class_balanced=True)
