"""The per-token attribution benchmark: corpus, token-row losses, scoring, and the --quick run's output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks import bif_tokens as bt
from benchmarks.common.bilingual import ALIGN, FR_START, LEXICON, SEQ_LEN, make_bilingual_corpus


def test_corpus_translations_follow_the_alignment():
    corpus = make_bilingual_corpus(60, 10, seed=2)
    assert corpus.train.shape == (60, SEQ_LEN) and corpus.queries.shape == (10, SEQ_LEN)
    for ids, align in zip(torch.cat([corpus.train, corpus.queries]).tolist(),
                          torch.cat([corpus.train_alignment, corpus.query_alignment]).tolist()):
        words = corpus.words(ids)
        assert words[FR_START - 1] == "=" and tuple(align) in ALIGN
        for j, a in enumerate(align):
            assert LEXICON[words[a]] == words[FR_START + j]
    train = {tuple(r) for r in corpus.train.tolist()}
    assert not any(tuple(r) in train for r in corpus.queries.tolist())
    assert len(train) == 60


def test_train_loss_token_rows_match_the_per_token_losses():
    corpus = make_bilingual_corpus(20, 2, seed=0)
    torch.manual_seed(0)
    model = bt.TinyTransformerLM(len(corpus.vocab), bt.PREDICTIONS, d=16, heads=2, layers=1)
    loss_fn = bt.make_train_loss(corpus.train)
    full = bt.token_losses(model, corpus.train)
    rows = {"seq": torch.tensor([3, 0, 3, 7]), "pos": torch.tensor([0, 11, 5, 2])}
    assert torch.allclose(loss_fn(model, rows), full[rows["seq"], rows["pos"]], atol=1e-6)
    one = {"seq": torch.tensor([7]), "pos": torch.tensor([2])}
    assert torch.allclose(loss_fn(model, one), full[7, 2:3], atol=1e-6)
    assert torch.allclose(loss_fn(model, [corpus.train[:4]]), full[:4].mean(1), atol=1e-6)


def test_chance_and_topk_rates():
    assert bt.chance_topk(10, 1, 1) == pytest.approx(0.1)
    assert bt.chance_topk(10, 2, 3) == pytest.approx(1 - math.comb(8, 3) / math.comb(10, 3))
    assert bt.chance_topk(10, 0, 3) == 0.0 and bt.chance_topk(10, 9, 2) == 1.0
    helpful = np.array([[3.0, 0.0], [2.0, 1.0], [1.0, 2.0]])
    match = np.array([[False, True], [True, False], [False, False]])
    rates = bt.topk_rates(helpful, match, ks=(1, 2))
    assert rates[1][0] == 0.0 and rates[2][0] == 0.5
    assert rates[1][1] == pytest.approx(1 / 3)


def test_quick_run_prints_every_rate_and_writes_the_figure(tmp_path, capsys):
    out = tmp_path / "bif_tokens.png"
    result = bt.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 0
    assert "| ranking | top-1 (chance) | top-5 (chance) | top-10 (chance) |" in printed
    expected = {"BIF, tokens: translation (EN)", "BIF, tokens: same word (FR)", "BIF, tokens: either",
                "BIF, English tokens only: translation", "BIF, sequences: contain the pair",
                "in-run per-query, sequences: contain the pair"}
    assert expected <= set(result["rates"])
    for label, by_k in result["rates"].items():
        assert f"| {label} |" in printed
        assert set(by_k) == set(bt.KS)
        for rate, chance in by_k.values():
            assert 0.0 <= rate <= 1.0 and 0.0 <= chance <= 1.0
    info = result["info"]
    assert info["n_train_tokens"] == 60 * bt.PREDICTIONS and info["n_query_tokens"] == 3 * 4
    assert np.isfinite(info["rhat"]) and info["bif_config"]["control_variate"] == "prior"
