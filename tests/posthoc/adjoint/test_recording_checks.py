"""What the adjoint pass refuses in a recording, and how it labels the scores it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inrun_shapley import ConfigurationError, LogError
from inrun_shapley.log import ShapleyLog
from tests.posthoc.adjoint.test_adjoint import run_adjoint, train


def test_a_gap_in_the_steps_is_refused(tmp_path):
    model, _, path = train(tmp_path, "sgd_momentum", steps=8)  # chunks of 3: 1-3, 4-6, 7-8
    m = json.loads((path / "manifest.json").read_text())
    del m["chunks"][1]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LogError, match=r"steps 4\.\.6 are missing"):
        run_adjoint(model, path)
    assert run_adjoint(model, path, last_steps=2).shape[1] == 3  # the steps after the gap are usable


@pytest.mark.parametrize("kind,sign", [("loss", -1), ("score", 1), (None, None)])
def test_log_says_what_the_scores_mean(tmp_path, kind, sign):
    model, _, path = train(tmp_path, "adamw")
    scores = run_adjoint(model, path, log_path=tmp_path / "log", output_kind=kind)
    log = ShapleyLog.load(tmp_path / "log")
    assert np.allclose(log.values, scores)
    assert log.score["kind"] == "adjoint"
    assert log.score["positive_means"] == "including the sample raises f_q (the query output)"
    assert log.helpful_sign == sign
    assert log.metadata["output_kind"] == kind


def test_output_kind_is_checked(tmp_path):
    model, _, path = train(tmp_path, "sgd", steps=1)
    with pytest.raises(ConfigurationError, match="output_kind must be one of"):
        run_adjoint(model, path, output_kind="margin")
