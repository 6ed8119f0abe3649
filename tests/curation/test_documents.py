"""Document-level values (sequence values summed per document) and the negative-value rule."""

from __future__ import annotations

import numpy as np
import pytest

from inrun_shapley.documents import document_values, negative_share
from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune

NAN = np.nan


def _log(tmp_path, steps, **kw):
    with ShapleyLogWriter(tmp_path / "run.shapley", **kw) as w:
        for step, (ids, vals) in enumerate(steps, start=1):
            w.add_step(step, np.array(ids), np.array(vals, dtype=float))
    return ShapleyLog.load(tmp_path / "run.shapley")


def test_sums_sequences_per_document_against_a_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50)
    scores[[3, 17]] = NAN
    doc_of = rng.integers(0, 9, size=50)
    doc_of[doc_of == 8] = 7  # document 8 has no sequence
    got = document_values(scores, doc_of, n_docs=10)
    for d in range(10):
        members = [s for s in range(50) if doc_of[s] == d and not np.isnan(scores[s])]
        if members:
            assert got[d] == pytest.approx(sum(scores[s] for s in members), abs=1e-12)
        else:
            assert np.isnan(got[d])
    mean = document_values(scores, doc_of, reduce="mean")
    d0 = [s for s in range(50) if doc_of[s] == 0 and not np.isnan(scores[s])]
    assert mean[0] == pytest.approx(np.mean(scores[d0]))


def test_log_helpfulness_summed_with_its_sign(tmp_path):
    steps = [([0, 1, 2], [0.5, -0.2, 0.1]), ([1, 2, 3], [-0.1, 0.3, 0.2])]
    log = _log(tmp_path, steps)
    doc_of = np.array([0, 1, 1, 0])
    got = document_values(log, doc_of, normalize="none")
    assert got.tolist() == pytest.approx([0.5 + 0.2, -0.3 + 0.4])
    np.testing.assert_allclose(document_values(log, doc_of), np.bincount(doc_of, log.helpfulness()))
    harmful_log = _log(tmp_path / "neg", steps, helpful_sign=-1)
    np.testing.assert_allclose(document_values(harmful_log, doc_of, normalize="none"), -got)


def test_sparse_sequence_ids_through_seq_ids(tmp_path):
    log = _log(tmp_path, [([10**12, 7], [0.4, -0.1]), ([5, 10**12], [-0.2, 0.1])])
    got = document_values(log, [2, 0, 1], seq_ids=[10**12, 5, 7], normalize="none")
    assert got.tolist() == pytest.approx([-0.2, -0.1, 0.5])
    with pytest.raises(SampleIdError, match="not in seq_ids"):
        document_values(log, [2, 0], seq_ids=[10**12, 5])
    with pytest.raises(SampleIdError, match="duplicates"):
        document_values(log, [2, 0, 1], seq_ids=[10**12, 5, 5])
    with pytest.raises(SampleIdError, match="one entry per sequence"):
        document_values(log, [2, 0], seq_ids=[10**12, 5, 7])


def test_negative_value_rule_prunes_documents():
    values = document_values(np.array([0.5, -0.1, 0.2, NAN, -0.4, 0.05]), np.array([0, 0, 1, 2, 1, 3]))
    assert values[:2].tolist() == pytest.approx([0.4, -0.2]) and np.isnan(values[2])
    assert negative_share(values) == pytest.approx(1 / 3)
    assert prune(values, fraction="auto").tolist() == [0, 2, 3]
    assert prune(values, fraction="auto").tolist() == prune(values, drop_negative=True).tolist()
    assert negative_share([NAN]) == 0.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(doc_of=[0, 1]), SampleIdError, "doc_of has 2 entries"),
        (dict(doc_of=[0, -1, 0, 0]), SampleIdError, "non-negative"),
        (dict(doc_of=[0, 1, 0, 0], n_docs=1), SampleIdError, "n_docs must be"),
        (dict(doc_of=[0, 1, 0, 0], reduce="max"), ConfigurationError, "reduce must be"),
        (dict(doc_of=[0.5, 1, 0, 0]), SampleIdError, "integers"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        document_values(np.array([0.1, 0.2, -0.1, 0.3]), **kwargs)


@pytest.mark.parametrize("fraction", ["half", "AUTO ", "0.2"])
def test_prune_refuses_strings_other_than_auto(fraction):
    with pytest.raises(ConfigurationError, match="'auto'"):
        prune(np.array([0.1, -0.2]), fraction=fraction)
