"""An adapter resuming a log whose ids are huge (hashes, global row numbers) continues from
the sparse totals: memory per seen id, never per ``max_id + 1``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from inrun_shapley.integration import ShapleyConfig
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from tests.callbacks.integration_setup import data, make_model, make_optimizer

HUGE = 2**40


def test_resumed_tracker_holds_the_logs_sparse_totals_and_continues(tmp_path):
    path = tmp_path / "log"
    ids = np.array([5, HUGE, HUGE + 7])
    with ShapleyLogWriter(path, record_steps=True, flush_every=1) as w:
        w.add_step(1, ids, np.array([0.1, -0.2, 0.3]))
        w.add_step(2, ids[:2], np.array([0.05, 0.25]))

    train, val = data()
    model = make_model()
    opt = make_optimizer(model.parameters())
    config = ShapleyConfig("Adapter", val_data=val, log_dir=path, resume=True, record_steps=True,
                           val_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    attached = config.build(model, opt)  # the old dense rebuild asked for 2**40 floats here
    tracker = attached.tracker
    totals = tracker.store.totals()
    assert tracker.step == 2 and tracker.store.last_step == 2
    assert totals["ids"].tolist() == ids.tolist()
    np.testing.assert_allclose(totals["value_sum"], [0.15, 0.05, 0.3])
    assert totals["count"].tolist() == [2, 2, 1]

    x, y = train.tensors
    with tracker.batch(torch.tensor([HUGE + 7, 3])):
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    opt.step()
    attached.close()
    log = ShapleyLog.load(path)
    assert log.last_step == 3 and log.ids.tolist() == [3, 5, HUGE, HUGE + 7]
    assert tracker.store.totals()["count"].tolist() == [1, 2, 2, 2]
    np.testing.assert_allclose(log.totals()["value_sum"], tracker.store.totals()["value_sum"], rtol=1e-12)
