"""The score description in the header: what a log's numbers mean, and ranking by it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inrun_shapley.errors import ConfigurationError, LogError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune

HARMFUL_HIGH = dict(score_kind="adjoint", positive_means="including the sample raises the query loss",
                    helpful_sign=-1)


def _log(path, values, **kw):
    with ShapleyLogWriter(path, **kw) as w:
        w.add_step(1, np.arange(len(values)), np.asarray(values, dtype=np.float64))
    return ShapleyLog.load(path)


def test_default_is_inrun_shapley(tmp_path):
    log = _log(tmp_path / "log", [0.1, -0.2])
    assert log.score["kind"] == "inrun_shapley" and log.helpful_sign == 1
    assert "lowered the validation loss" in log.score["positive_means"]
    on_disk = json.loads((tmp_path / "log" / "meta.json").read_text())["score"]
    assert on_disk == log.score


def test_helpful_sign_minus_one_prunes_the_high_scores(tmp_path):
    # higher = more harmful: ids 1 and 3 raise the loss most, they must go
    values = [-0.3, 0.9, -0.1, 0.5, 0.0]
    log = _log(tmp_path / "log", values, **HARMFUL_HIGH)
    assert log.helpful_sign == -1
    assert prune(log, fraction=0.4, normalize="none").tolist() == [0, 2, 4]
    assert prune(log, drop_negative=True, normalize="none").tolist() == [0, 2, 4]  # helpfulness < 0
    assert prune(log, keep_top=1, normalize="none").tolist() == [0]
    ids, scores = log.top(k=2, normalize="none")
    assert ids.tolist() == [0, 2] and scores.tolist() == [-0.3, -0.1]  # scores as logged
    ids, scores = log.top(k=1, largest=False, normalize="none")
    assert ids.tolist() == [1] and scores.tolist() == [0.9]
    np.testing.assert_array_equal(log.helpfulness("none"), -np.asarray(values))
    # the same numbers under the default sign keep the opposite samples
    plain = _log(tmp_path / "plain", values)
    assert prune(plain, fraction=0.4, normalize="none").tolist() == [1, 3, 4]


def test_unknown_sign_refuses_ranking(tmp_path):
    log = _log(tmp_path / "log", [0.1, 0.2], score_kind="adjoint", positive_means="raises f_q",
               helpful_sign=None)
    assert log.helpful_sign is None
    for call in (lambda: prune(log, fraction=0.5), lambda: log.top(k=1), lambda: log.helpfulness()):
        with pytest.raises(LogError, match="helpful_sign null.*helpful_sign=1 or -1"):
            call()
    np.testing.assert_array_equal(log.scores("none"), [0.1, 0.2])  # raw scores stay readable


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"score_kind": "adjoint"}, "needs positive_means"),
        ({"score_kind": "", "positive_means": "x"}, "score_kind must be"),
        ({"helpful_sign": 2}, "helpful_sign must be"),
        ({"helpful_sign": True}, "helpful_sign must be"),
        ({"positive_means": 3}, "positive_means must be"),
    ],
)
def test_bad_score_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        ShapleyLogWriter(tmp_path / "log", **kwargs)


def test_resume_with_another_score_refused(tmp_path):
    _log(tmp_path / "log", [0.1], **HARMFUL_HIGH)
    with pytest.raises(LogError, match="score"):
        ShapleyLogWriter(tmp_path / "log", resume=True)
    ShapleyLogWriter(tmp_path / "log", resume=True, **HARMFUL_HIGH).close()


def _as_version_1(path, metadata=None):
    header = json.loads((path / "meta.json").read_text())
    header["format_version"] = 1
    del header["score"]
    if metadata is not None:
        header["metadata"] = metadata
    (path / "meta.json").write_text(json.dumps(header))


def test_version_1_logs(tmp_path):
    _log(tmp_path / "a", [0.1, -0.1])
    _as_version_1(tmp_path / "a")
    log = ShapleyLog.load(tmp_path / "a")
    assert log.score["kind"] == "inrun_shapley" and log.helpful_sign == 1
    assert prune(log, keep_top=1, normalize="none").tolist() == [0]
    # the adjoint pass wrote version 1 logs with this metadata: its sign is not known
    _log(tmp_path / "b", [0.1, -0.1])
    _as_version_1(tmp_path / "b", {"kind": "adjoint_influence", "sign": "positive = including the sample raises f_q"})
    log = ShapleyLog.load(tmp_path / "b")
    assert log.score == {"kind": "adjoint", "positive_means": "positive = including the sample raises f_q",
                         "helpful_sign": None}
    with pytest.raises(LogError, match="helpful_sign null"):
        prune(log, fraction=0.5)


@pytest.mark.filterwarnings("ignore:merge")
def test_merge_keeps_score_and_refuses_mixed(tmp_path):
    a = _log(tmp_path / "a", [0.1, 0.2], **HARMFUL_HIGH)
    b = _log(tmp_path / "b", [0.3], **HARMFUL_HIGH)
    assert ShapleyLog.merge([a, b]).score == a.score
    c = _log(tmp_path / "c", [0.3])
    with pytest.raises(LogError, match="score"):
        ShapleyLog.merge([a, c])
