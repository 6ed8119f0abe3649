"""The core install (torch, numpy, lightning, accelerate, tqdm) runs without the extras, and a
missing extra is named in the error (issue 25). Checked in fresh interpreters where the optional
modules cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = """
import sys
for name in ("scipy", "sklearn", "matplotlib", "pandas"):
    sys.modules[name] = None  # 'import name' now raises ImportError, as when it is not installed
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"})


def test_core_runs_without_scipy_sklearn_matplotlib():
    out = _run("""
        import numpy as np, torch
        from torch import nn
        from inrun_shapley import ShapleyTracker
        from inrun_shapley.metrics import linear_datamodeling_score, roc_auc, spearman
        x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        model = nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        tracker = ShapleyTracker(model, opt, val_data=(x[:4], y[:4]), val_loss_fn=loss)
        with tracker.batch(torch.arange(8)):
            loss(model, (x[:8], y[:8])).mean().backward()
        opt.step()
        assert tracker.counts.sum() == 8
        assert spearman([1, 2, 3], [1, 3, 2]) == 0.5 and roc_auc([0.1, 0.9], [False, True]) == 1.0
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_missing_extra_is_named():
    out = _run("""
        import os, tempfile
        from inrun_shapley.errors import MissingExtraError
        from inrun_shapley.posthoc.weighting import GroupWeights, plot_group_weights
        from inrun_shapley.app.digits import load_digits_splits
        try:
            plot_group_weights(GroupWeights(("a", "b"), [0.5, 1.5]), os.path.join(tempfile.mkdtemp(), "w.png"))
        except MissingExtraError as exc:
            print("plots:", exc)
        try:
            load_digits_splits([100])
        except MissingExtraError as exc:
            print("demo:", exc)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'inrun-shapley[plots]'" in out.stdout and "'matplotlib'" in out.stdout, out.stdout
    assert "pip install 'inrun-shapley[demo]'" in out.stdout and "'scikit-learn'" in out.stdout, out.stdout
