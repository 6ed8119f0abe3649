"""The word-disjoint paraphrase corpus and the source-identification benchmark's scoring."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from benchmarks import source_id_paraphrase as sid
from benchmarks.common.textdata import DISJOINT_SLOTS, make_disjoint_corpus

FUNCTION_WORDS = {"the", "in"}


def test_disjoint_queries_share_no_content_word_with_their_source():
    corpus = make_disjoint_corpus(240, 40, seed=3)
    for q, src in zip(corpus.queries, corpus.query_source):
        shared = set(q.split()) & set(corpus.sentences[src].split())
        assert shared <= FUNCTION_WORDS, (q, corpus.sentences[src])


def test_disjoint_forms_are_interchangeable_in_training():
    """Both forms of every concept occur in training, in the same slot, several times each."""
    corpus = make_disjoint_corpus(240, 40, seed=0)
    counts = Counter(w for s in corpus.sentences for w in s.split())
    for slot in DISJOINT_SLOTS:
        for a, b in slot:
            assert counts[a] >= 2 and counts[b] >= 2, (a, b, counts[a], counts[b])
    assert all(w in corpus.tokenizer.stoi for q in corpus.queries for w in q.split())


def test_disjoint_facts_have_one_source():
    corpus = make_disjoint_corpus(288, 10, seed=1)
    firsts = [tuple(s.split()[:2]) for s in corpus.sentences]
    canon = {w: i for slot in DISJOINT_SLOTS[:2] for i, pair in enumerate(slot) for w in pair}
    keys = [(canon[a], canon[b]) for a, b in firsts]
    assert len(set(keys)) == len(keys)
    with pytest.raises(ValueError, match="n_sentences <= 288"):
        make_disjoint_corpus(289, 10)


def test_lexical_baselines_are_blind_on_disjoint_queries():
    corpus = make_disjoint_corpus(240, 40, seed=0)
    for fn in (sid.bm25_matrix, sid.tfidf_matrix, sid.jaccard_matrix):
        ranks, r1, _ = sid.source_ranks(fn(corpus.queries, corpus.sentences), corpus.query_source)
        assert r1.mean() < 0.05 and ranks.mean() > 240 / 3


def test_source_ranks_expected_rank_under_ties():
    scores = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0], [0.0, 0.0]])
    ranks, r1, r10 = sid.source_ranks(scores, [0, 2])
    assert ranks.tolist() == [1.5, 2.0] and r1.tolist() == [0.5, 0.0] and r10.tolist() == [1.0, 1.0]


def test_bm25_prefers_the_sentence_with_the_rare_shared_word():
    s = sid.bm25_matrix(["cat sat"], ["the cat sat", "the dog sat", "a bird flew"])
    assert s[0, 0] > s[1, 0] > s[2, 0] == 0


@pytest.mark.slow
def test_quick_run_prints_every_method(capsys):
    assert sid.main(["--quick", "--corpus", "disjoint", "--estimators", "sgd", "nonsense",
                     "--normalizations", "none", "step_z", "--peers", "tracin", "bm25"]) == 0
    out = capsys.readouterr().out
    for name in ("sgd/none", "sgd/step_z", "tracin", "bm25", "NOT RUN nonsense"):
        assert name in out
