"""SGD as pure functions against torch's real step (see harness.py)."""

from __future__ import annotations

import pytest
import torch

from inrun_shapley import ConfigurationError
from inrun_shapley.optim import sgd
from tests.optim.harness import assert_jacobian_matches_autograd, assert_step_matches, run_steps

S = torch.optim.SGD
VARIANTS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True),
    "nesterov_decay": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
    "weight_decay": dict(lr=0.1, weight_decay=0.1),
    "maximize": dict(lr=0.1, momentum=0.7, dampening=0.2, weight_decay=0.05, maximize=True),
    "foreach": dict(lr=0.1, momentum=0.9, weight_decay=0.1, foreach=True),
    "fused": dict(lr=0.1, momentum=0.9, weight_decay=0.1, fused=True),
    "tensor_lr": dict(lr=torch.tensor(0.1), momentum=0.9, foreach=False),
}
DTYPES = {torch.float64: 1e-12, torch.float32: 1e-6}


def records(name, dtype):
    kwargs = VARIANTS[name]
    if kwargs.get("fused"):
        try:
            next(iter(run_steps(S, kwargs, dtype, steps=1)))
        except RuntimeError as err:  # pragma: no cover - depends on the build
            pytest.skip(f"fused SGD not supported here: {err}")
    return list(run_steps(S, kwargs, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", VARIANTS)
def test_update_equals_the_real_step(name, dtype):
    for r in records(name, dtype):
        assert_step_matches(r, sgd.update, r["state"], DTYPES[dtype])


@pytest.mark.parametrize("name", VARIANTS)
def test_jacobian_equals_autograd(name):
    for r in records(name, torch.float64):
        assert_jacobian_matches_autograd(r, sgd.update, sgd.update_jacobian_diag, r["state"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", VARIANTS)
def test_state_before_step_round_trips(name, dtype):
    rel = DTYPES[dtype]
    for r in records(name, dtype):
        rec = sgd.state_before_step(r["state_after"], r["g"], r["theta"], r["group"], r["before"])
        true = r["state"].get("momentum_buffer")
        if sgd.hyper(r["group"]).momentum == 0:
            assert rec == {}
        elif true is None:
            assert rec == {"momentum_buffer": None}
        else:
            torch.testing.assert_close(rec["momentum_buffer"], true, rtol=50 * rel, atol=50 * rel)
        assert_step_matches(r, sgd.update, rec, 10 * rel)


def test_state_before_step_needs_the_pre_hook_flag_with_momentum():
    r = records("momentum", torch.float64)[0]
    with pytest.raises(ConfigurationError, match="before="):
        sgd.state_before_step(r["state_after"], r["g"], r["theta"], r["group"])


def test_drift_and_coefficient_agree_with_the_update():
    """The tracker's fixed-state terms are the affine form of ``update``:
    ``update(g) = drift - sign·lr·coeff·g``."""
    for name in ("momentum", "dampening", "nesterov_decay", "maximize"):
        for r in records(name, torch.float64):
            t = sgd.SGDAdapter().terms(r["g"], r["group"], r["state_after"], r["before"], r["theta"],
                                       need_drift=True, need_loo=False)
            want = sgd.update(r["g"], r["theta"], r["group"], r["state"])
            torch.testing.assert_close(t.drift - t.sign * t.lr * t.coeff * r["g"], want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", VARIANTS)
def test_state_after_step_equals_torch_state(name):
    for r in records(name, torch.float64):
        got = sgd.state_after_step(r["g"], r["theta"], r["group"], r["state"])
        for key in ("momentum_buffer",):
            if key in r["state_after"] and r["state_after"][key] is not None:
                torch.testing.assert_close(got[key], r["state_after"][key], rtol=1e-12, atol=1e-15)
            else:
                assert key not in got


@pytest.mark.parametrize("name", VARIANTS)
def test_midpoint_step_equals_update_and_jacobian_at_half_the_gradient(name):
    for r in records(name, torch.float64):
        half = 0.5 * r["g"]
        want_delta = sgd.update(half, r["theta"], r["group"], r["state"])
        want_jac = sgd.update_jacobian_diag(half, r["theta"], r["group"], r["state"])
        delta, jac = sgd.midpoint_step(r["g"], r["theta"], r["group"], r["state"])
        torch.testing.assert_close(delta, want_delta, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(jac, want_jac, rtol=1e-12, atol=0)
