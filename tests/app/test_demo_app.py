"""The demo leaves the process as it found it and saves what ``report --highlight`` needs."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import torch

from inrun_shapley.app.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo run; returns (output folder, process state before, process state after)."""
    import matplotlib

    # Importing Lightning installs its own warning filters and loggers once per process: that is
    # the import, not the demo, so it happens before the "before" snapshot.
    import lightning.pytorch  # noqa: F401

    import inrun_shapley.callbacks  # noqa: F401

    def state():
        return {
            "root level": logging.getLogger().level,
            "lightning level": logging.getLogger("lightning.pytorch").level,
            "warning filters": list(warnings.filters),
            "backend": matplotlib.get_backend(),
            "threads": torch.get_num_threads(),
            "rng": torch.random.get_rng_state(),
        }

    original = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend the plots must not replace (they use none)
    try:
        out = tmp_path_factory.mktemp("demo")
        before = state()
        assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
        after = state()
    finally:
        matplotlib.use(original)
    return out, before, after


@pytest.mark.slow
def test_demo_restores_process_state(demo_run):
    _, before, after = demo_run
    assert after["backend"] == before["backend"] == "svg"
    for key in ("root level", "lightning level", "warning filters", "threads"):
        assert after[key] == before[key], key
    assert torch.equal(after["rng"], before["rng"])  # the models are seeded without the global generator


@pytest.mark.slow
def test_report_highlight_reproduces_the_demo_auc(demo_run, capsys):
    out, _, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flipped_ids"] == ["seed0/flipped_ids.txt"]
    flipped = out / "seed0" / "flipped_ids.txt"
    n_flipped = len(flipped.read_text().split())
    assert n_flipped == round(summary["config"]["flip"] * summary["config"]["n_train"])
    capsys.readouterr()
    assert main(["report", str(out / "seed0" / "log_midpoint"), "--highlight", str(flipped), "--out",
                 str(out / "report")]) == 0
    text = capsys.readouterr().out
    auc = re.search(r"AUC\(low score→marked\)\s+([0-9.]+)", text)[1]
    assert auc == f"{summary['auc']['midpoint/step_std'][0]:.3f}"
    assert (out / "report" / "value_histogram.png").stat().st_size > 0
