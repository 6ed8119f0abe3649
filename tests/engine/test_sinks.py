"""The tracker closes the sinks it was given: on close() and at interpreter exit (issue 25)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from inrun_shapley import ShapleyLog, ShapleyLogWriter, ShapleyTracker

ROOT = Path(__file__).resolve().parents[2]

TRAIN = """
import sys, torch
from torch import nn
from inrun_shapley import ShapleyLogWriter, ShapleyTracker
torch.manual_seed(0)
x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
model = nn.Linear(4, 2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
tracker = ShapleyTracker(model, opt, val_data=(x[:4], y[:4]), val_loss_fn=loss,
                         sink=ShapleyLogWriter(sys.argv[1], flush_every=0))
for s in range(3):
    ids = torch.arange(4) + 4 * s
    with tracker.batch(ids):
        loss(model, (x[ids], y[ids])).mean().backward()
    opt.step(); opt.zero_grad()
"""


def test_close_flushes_and_closes_the_sink(tmp_path):
    namespace = {"__name__": "__test__"}
    exec(TRAIN.replace("sys.argv[1]", repr(str(tmp_path / "log"))), namespace)
    tracker = namespace["tracker"]
    assert not (tmp_path / "log" / "meta.json").exists()  # flush_every=0: nothing on disk yet
    tracker.close()
    assert tracker.sink._closed
    log = ShapleyLog.load(tmp_path / "log")
    assert log.last_step == 3 and log.counts.sum() == 12
    tracker.close()  # idempotent
    ShapleyLogWriter(tmp_path / "log", resume=True).close()  # its lock was released


def test_a_script_that_never_closes_still_writes_its_log(tmp_path):
    subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "log")], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    log = ShapleyLog.load(tmp_path / "log")
    assert log.last_step == 3 and log.counts.sum() == 12
