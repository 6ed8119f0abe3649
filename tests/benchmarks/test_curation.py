"""The LM data-curation benchmark: corpus, baselines' scores, steps to target, a quick run."""

from __future__ import annotations

import json
import math

import numpy as np

from benchmarks import curation as cur
from benchmarks.common.webtext import LOW_KINDS, gzip_score, heuristic_score, make_corpus, to_sequences


def test_corpus_mixes_the_low_quality_kinds():
    c = make_corpus(n_docs=60, low_fraction=0.2, seed=1)
    assert len(c.docs) == 60 and c.low.sum() == 12
    assert {k for k in c.kind if k != "clean"} == set(LOW_KINDS)
    assert not set(c.docs) & set(c.heldout)
    assert make_corpus(n_docs=60, low_fraction=0.2, seed=1).docs == c.docs  # deterministic


def test_sequences_carry_their_document():
    seqs, doc_of = to_sequences(["abcdefghij", "xyz", "é"], 4)
    assert seqs.shape == (5, 5) and doc_of.tolist() == [0, 0, 0, 1, 2]
    assert bytes(seqs[0].tolist()) == b"abcde" and bytes(seqs[1].tolist()) == b"efghi"
    assert seqs[2].tolist() == [ord("i"), ord("j"), 0, 0, 0]  # windows overlap by one byte, padded
    assert bytes(seqs[4, :2].tolist()).decode() == "é"


def test_baseline_scores_rank_junk_below_prose():
    prose = ("The assert statement is a convenient way to insert debugging assertions into a program. "
             "It is the simple form of the statement that is used in most of the code. ") * 3
    boiler = "Home | About | Contact | Privacy policy\n" * 40
    blob = "QmFzZTY0IGJsb2Igb2YgcmFuZG9tIGJ5dGVzIQ==" * 10
    docs = [prose, prose.replace("statement", "stmt"), boiler, blob, prose + " extra words here"]
    gz = gzip_score(docs)
    assert gz[2] < gz[0] and gz[3] < gz[0]  # too repetitive, and far from text's ratio
    h = heuristic_score(docs)
    assert h[3] < h[0] and h[2] < h[0]


def test_keep_after_drop_and_steps_to_target():
    assert cur.keep_after_drop(np.array([0.3, -1.0, 0.2, -1.0]), 2).tolist() == [0, 2]
    curve = [(0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5)]
    assert cur.steps_to(curve, 2.5) == 15.0
    assert cur.steps_to(curve, 1.5) == 30.0
    assert math.isnan(cur.steps_to(curve, 1.0))


def test_quick_run(tmp_path, capsys):
    assert cur.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "negative-value share" in out and "| all data |" in out and "| gzip @" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) >= {"all@0.000", f"in-run@{results['auto_fraction']:.3f}"}
    assert (tmp_path / "curation.png").read_bytes()[:4] == b"\x89PNG"
    other = json.loads((tmp_path / "results.json").read_text())  # a second seed's run, as a part
    other["config"]["seeds"] = [7]
    other["runs"] = {k: {"7": v["0"]} for k, v in other["runs"].items()}
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert cur.main(["--merge", str(tmp_path / "results.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["config"]["seeds"] == [0, 7] and set(merged["runs"]["all@0.000"]) == {"0", "7"}
