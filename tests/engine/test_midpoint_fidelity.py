"""Fidelity of the default estimator against exact Shapley values of the real optimizer step.

Exact values by enumerating all 2^8 subsets of a batch of 8 under the real step (Adam's second
moment depends on the subset too), on a spread of models (MLP with LayerNorm, Conv2d, Embedding),
optimizers (Adam, AdamW, SGD with momentum; two learning rates each), after 20 warm-up steps,
two seeds. The harness is ``benchmarks.fidelity`` (its full run is recorded in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.fidelity import LRS, OPTIMIZERS, Setting, run_setting


@pytest.mark.slow
def test_default_estimator_is_the_steps_shapley_value_across_the_spread():
    pearsons = []
    for model, opt in itertools.product(["mlp_ln", "conv", "embed"], OPTIMIZERS):
        for lr in LRS[opt]:
            for seed in (0, 1):
                rows = run_setting(Setting(model, opt, lr), seed, 8, [21], estimators=[("midpoint", 1)])
                pearsons += [r for r, _ in rows["midpoint"]]
                # the fast path is the brute-force rule (values, not only ranks)
                assert all(abs(a - b) < 1e-6 for (a, _), (b, _) in zip(rows["midpoint"], rows["midpoint_bf"]))
    pearsons = np.array(pearsons)
    assert len(pearsons) == 36
    assert pearsons.mean() >= 0.99, pearsons.mean()
    assert np.percentile(pearsons, 10) >= 0.98, np.percentile(pearsons, 10)
