"""Quick runs of the issue-27 benchmarks: BIF at its defaults and the adjoint at small removals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from benchmarks import adjoint_lds, bif_defaults, lds_harness, small_removals


@pytest.fixture(scope="module")
def quick_setup(tmp_path_factory):
    return lds_harness.build_setup(tmp_path_factory.mktemp("lds_cache"), quick=True)


def test_weighted_loop_is_the_full_run_and_removals_are_cached(quick_setup):
    assert small_removals.protocol_check(quick_setup) == 0.0
    judged = small_removals.removal_setup(quick_setup, 0.05, n_models=3)
    assert judged.subsets.shape == (3, quick_setup.n_train)
    assert np.all((~judged.subsets).sum(1) == round(0.05 * quick_setup.n_train))
    again = small_removals.removal_setup(quick_setup, 0.05, n_models=3)  # from the cache
    assert np.array_equal(again.outputs["margin"], judged.outputs["margin"])
    # the outputs are those of the weighted run without the removed rows
    model = small_removals.train_weighted(quick_setup, torch.from_numpy(judged.subsets[0].astype(np.float32)))
    margins, _ = lds_harness.query_outputs(model, quick_setup.x_query, quick_setup.y_query)
    assert np.allclose(margins, judged.outputs["margin"][0])


@pytest.mark.slow
def test_adjoint_quick_prints_the_small_removal_tables(quick_setup, capsys):
    adjoint_lds.main(["--quick", "--no-peers", "--removals", "0.05,0.5", "--removal-models", "4",
                      "--cache-dir", str(quick_setup.path.parent)])
    out = capsys.readouterr().out
    assert "| method | harness α = 0.5 (reshuffled) | 5% removed | 50% removed |" in out
    row = re.search(r"\| adjoint full J, damping=replay \(5% probes\) \| ([-\d.]+) \| ([-\d.]+) \| ([-\d.]+) \|", out)
    assert row and all(np.isfinite(float(v)) for v in row.groups())
    assert "5%: median rel. error" in out and "-> ρ =" in out


@pytest.mark.slow
def test_bif_defaults_quick_prints_default_vs_tuned(quick_setup, monkeypatch, capsys):
    monkeypatch.setattr(bif_defaults, "ekfac", lambda setup: None)  # the budget falls back to 5 s units
    out = bif_defaults.main(quick_setup, quick=True, search=False)
    text = capsys.readouterr().out
    assert "defaults now: `BIFConfig()`" in text and "best of the search" in text and "budget_s=1×5.0" in text
    for key in ("default", "tuned", "budget1"):
        assert np.isfinite(out[key][0]) and out[key][1] > 0


@pytest.mark.slow
def test_adjoint_gap_report_separates_noise_from_linearization(quick_setup, capsys):
    adjoint_lds.main(["--quick", "--gap", "--removal-models", "4", "--cache-dir", str(quick_setup.path.parent)])
    out = capsys.readouterr().out
    agree = re.search(r"Spearman\(exact replay, float32 retraining\) ([-\d.]+)", out)
    assert agree and float(agree.group(1)) > 0.99  # the protocol leaves no training noise
    small = re.findall(r"δ = 0.001: ([\d.]+)", out)
    assert small and all(float(v) < 0.01 for v in small)  # the scores are the derivative
