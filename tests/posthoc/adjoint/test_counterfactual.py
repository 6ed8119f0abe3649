"""Exact counterfactual replays and the adjoint's per-query error estimate, against autograd
unrolls of the weighted run (``test_adjoint.unroll``: every sample's loss term weighted, the
batch mean's denominator unchanged, the same batches and hyperparameters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrun_shapley import ConfigurationError
from inrun_shapley.posthoc.adjoint import removal_check, replay_outputs
from inrun_shapley.posthoc.adjoint.influence import DAMPING_CANDIDATES
from tests.posthoc.adjoint.test_adjoint import (
    DT, N, clipped_run, data, loss_fn, neg_loss_fn, output_fn, run_adjoint, train, unroll,
)


def weights():
    w = torch.ones(3, N, dtype=DT)
    w[1, [0, 5]] = 0.0  # two rows removed
    w[2, 3] = 0.0
    w[2, 7] = 0.5  # and a fractional weight
    return w


@pytest.mark.parametrize("opt_name,every", [("sgd", 1), ("sgd_nesterov", 3), ("adam", 1), ("adamw", 1),
                                            ("adamw", 3), ("adam_maximize", 1)])
def test_replay_equals_the_weighted_run(tmp_path, opt_name, every):
    model, init, path = train(tmp_path, opt_name, every=every)
    objective = neg_loss_fn if "maximize" in opt_name else loss_fn
    x, y, xq = data()
    w = weights()
    got, replay_error = replay_outputs(model, path, (x, y), objective, xq, output_fn, w.numpy())
    ref = torch.stack([unroll(opt_name, init, w[r]).detach() for r in range(3)]).numpy()
    assert got.shape == (3, 3)
    assert np.abs(got - ref).max() < 1e-10 * max(np.abs(ref).max(), 1.0)
    assert replay_error < 1e-12


def test_removal_check_measures_the_linearization_error(tmp_path):
    model, init, path = train(tmp_path, "adamw")
    x, y, xq = data()
    exact = run_adjoint(model, path, jacobian="full")  # the derivative of the real run
    check = removal_check(exact, model, path, (x, y), loss_fn, xq, output_fn, fraction=0.1, probes=3, seed=1)
    assert len(check.removed) == 3 and all(len(s) == 1 for s in check.removed)
    for r, ids in enumerate(check.removed):  # the measured change is the unrolled run's
        w = torch.ones(N, dtype=DT)
        w[torch.as_tensor(ids)] = 0.0
        change = (unroll("adamw", init, w) - unroll("adamw", init, torch.ones(N, dtype=DT))).detach().numpy()
        assert np.abs(check.actual[r] - change).max() < 1e-10
        assert np.allclose(check.predicted[r], -exact[ids].sum(0))
    # a quarter of a batch under Adam is not a small change (relative error 0.25-0.45 here), but
    # the derivative still predicts it far better than no change at all
    assert np.all(check.relative < 0.6)
    assert np.all(check.scale > 0)
    # predicting no change is exactly as wrong as the change itself
    none = removal_check(np.zeros_like(exact), model, path, (x, y), loss_fn, xq, output_fn, fraction=0.1,
                         probes=3, seed=1)
    assert np.allclose(none.relative, 1.0)


def test_replay_refuses_what_it_cannot_replay(tmp_path):
    model, _, path = train(tmp_path, "adamw")
    x, y, xq = data()
    with pytest.raises(ConfigurationError, match="weights must be"):
        replay_outputs(model, path, (x, y), loss_fn, xq, output_fn, np.ones(N))
    with pytest.raises(ConfigurationError, match="fraction must be"):
        removal_check(np.zeros((N, 3)), model, path, (x, y), loss_fn, xq, output_fn, fraction=1.5)
    clipped, clipped_path = clipped_run(tmp_path)
    with pytest.raises(ConfigurationError, match="cannot be replayed exactly"):
        replay_outputs(clipped, clipped_path, (x, y), loss_fn, xq, output_fn, np.ones((1, N)))


def test_a_small_weight_change_replayed_is_the_adjoint_derivative(tmp_path):
    """Finite differences of exact replays (row weight 1 - δ) give the ``full`` adjoint's scores."""
    model, _, path = train(tmp_path, "adamw")
    x, y, xq = data()
    exact = run_adjoint(model, path, jacobian="full")
    delta = 1e-6
    w = np.ones((3, N))
    w[1, 2] -= delta
    w[2, 11] -= delta  # sample 11 is only in the first step
    out, _ = replay_outputs(model, path, (x, y), loss_fn, xq, output_fn, w)
    for r, i in ((1, 2), (2, 11)):
        fd = (out[0] - out[r]) / delta
        assert np.abs(fd - exact[i]).max() < 1e-4 * max(np.abs(exact[i]).max(), 1e-3)


def test_replay_damping_picks_the_candidate_with_the_smallest_measured_error(tmp_path):
    model, _, path = train(tmp_path, "adamw")
    x, y, xq = data()
    info = {}
    got = run_adjoint(model, path, jacobian="full", damping="replay", probe_fraction=0.1, probes=3, info=info)
    errors = info["damping_errors"]
    assert list(errors) == list(DAMPING_CANDIDATES)
    assert info["rho"] == min(errors, key=errors.get)
    # the stacked pass gives each candidate's own scores
    assert np.abs(got - run_adjoint(model, path, jacobian="full", damping=info["rho"])).max() < 1e-12
    for rho in DAMPING_CANDIDATES:
        scores = run_adjoint(model, path, jacobian="full", damping=rho)
        check = removal_check(scores, model, path, (x, y), loss_fn, xq, output_fn, fraction=0.1, probes=3, seed=0)
        assert np.isclose(errors[rho], np.median(check.relative))
        if rho == info["rho"]:
            assert np.allclose(info["check"].error, check.error)
    with pytest.raises(ConfigurationError, match="cannot resume"):
        run_adjoint(model, path, damping="replay", checkpoint=tmp_path / "ck.pt")
