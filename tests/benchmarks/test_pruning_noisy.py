"""The noisy-label pruning benchmark: rankings, class-balanced dropping, a quick run."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import pruning_noisy as pn


def test_keep_lowest_dropped_global_and_per_class():
    score = np.array([5.0, 1.0, 4.0, 0.0, 3.0, 2.0])
    assert pn.keep_lowest_dropped(score, 0.5).tolist() == [0, 2, 4]
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert pn.keep_lowest_dropped(score, 1 / 3, labels).tolist() == [0, 2, 4, 5]


def test_percentile_orders_scores():
    assert pn.percentile(np.array([3.0, -1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]


def test_synthetic_task_flips_a_fifth_of_the_labels():
    task = pn.synthetic_task(0)
    assert task.flipped.mean() == 0.2 and task.train[0].shape == (1000, 20)
    assert int(task.train[1].max()) == 4 and len(task.test[0]) == 1000


@pytest.mark.slow
def test_quick_run(capsys):
    assert pn.main(["--quick", "--datasets", "synthetic", "--estimators", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "sgd:std" in out and "TracIn" in out and "EL2N" in out
