"""``inrun-shapley prune --fraction auto`` and ``--documents``: the user's curation path."""

from __future__ import annotations

import numpy as np
import pytest

from inrun_shapley.app.cli import main
from inrun_shapley.documents import document_values
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune


@pytest.fixture
def seq_log(tmp_path):
    """12 sequences of 4 documents (3 each); documents 1 and 3 have negative values."""
    rng = np.random.default_rng(0)
    doc_of = np.repeat(np.arange(4), 3)
    path = tmp_path / "lm.shapley"
    with ShapleyLogWriter(path) as w:
        for step in range(1, 9):
            ids = rng.choice(12, size=6, replace=False)
            w.add_step(step, ids, np.where(doc_of[ids] % 2 == 1, -0.3, 0.2) + 0.05 * rng.normal(size=6))
    np.save(tmp_path / "doc_of.npy", doc_of)
    return path


def test_fraction_auto_is_the_negative_value_rule(seq_log, tmp_path, capsys):
    out = tmp_path / "keep.txt"
    assert main(["prune", str(seq_log), "--fraction", "auto", "--out", str(out)]) == 0
    kept = np.loadtxt(out, dtype=np.int64)
    log = ShapleyLog.load(seq_log)
    assert kept.tolist() == prune(log, drop_negative=True).tolist()
    assert set(kept.tolist()) == {0, 1, 2, 6, 7, 8}
    assert "kept 6 of 12 ids" in capsys.readouterr().out


def test_documents_pruned_by_summed_values(seq_log, tmp_path, capsys):
    out = tmp_path / "keep_docs.npy"
    argv = ["prune", str(seq_log), "--fraction", "auto", "--documents", str(tmp_path / "doc_of.npy"), "--out", str(out)]
    assert main(argv) == 0
    assert np.load(out).tolist() == [0, 2]
    assert "kept 2 of 4 documents" in capsys.readouterr().out
    values = document_values(ShapleyLog.load(seq_log), np.load(tmp_path / "doc_of.npy"))
    assert main(argv[:3] + ["0.25"] + argv[4:]) == 0
    assert np.load(out).tolist() == np.sort(np.argsort(values)[1:]).tolist()


def test_documents_errors_name_the_flags(seq_log, tmp_path, capsys):
    np.savetxt(tmp_path / "short.txt", [0, 0, 1], fmt="%d")
    rc = main(["prune", str(seq_log), "--fraction", "auto", "--documents", str(tmp_path / "short.txt"),
               "--out", str(tmp_path / "k.txt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --documents has 3 entries") and len(err.splitlines()) == 1
    rc = main(["prune", str(seq_log), "--fraction", "auto", "--documents", str(tmp_path / "doc_of.npy"),
               "--n-ids", "2", "--out", str(tmp_path / "k.txt")])
    assert rc == 2 and "--n-ids must be" in capsys.readouterr().err
