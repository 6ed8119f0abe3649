"""The README's main command runs end to end (tiny configuration) and writes what it promises."""

from __future__ import annotations

import json

import pytest

from inrun_shapley.app.cli import main
from inrun_shapley.log import ShapleyLog


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Flipped-label detection AUC" in out and "Test accuracy after retraining" in out
    for name in ("values_clean_vs_flipped.png", "accuracy_vs_fraction_pruned.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.5 < summary["auc"]["midpoint/step_std"][0] <= 1.0
    log = ShapleyLog.load(tmp_path / "seed0" / "log_midpoint")
    assert log.counts[:1000].min() == 2  # every sample seen once per epoch, 2 epochs
    # running it again into the same folder replaces the demo's own logs
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--epochs", "1"]) == 0
    assert ShapleyLog.load(tmp_path / "seed0" / "log_midpoint").counts[:1000].max() == 1


def test_demo_bad_arguments(capsys):
    assert main(["demo", "--flip", "1.5"]) == 2
    assert "error: --flip must be between 0 and 1" in capsys.readouterr().err
