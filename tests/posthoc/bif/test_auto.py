"""The self-configuring BIF defaults (``BIFConfig()``: every sampler setting ``"auto"``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley import ConfigurationError
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence, best_thin
from inrun_shapley.posthoc.bif.auto import (
    BIAS_TOLERANCE, PRIOR_DOMINANCE, RELATIVE_SPREAD, auto_fields, posterior_settings, sampling_settings,
)

F64 = torch.float64


def _squared(m, b):
    x, y = b
    return 0.5 * (m(x).squeeze(-1) - y) ** 2


def problem(n=64, d=4):
    torch.manual_seed(0)
    x = torch.randn(n, d, dtype=F64)
    y = x @ torch.randn(d, dtype=F64) + 0.1 * torch.randn(n, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)  # full batch: the Hessian is xᵀx/n exactly
    return model, loader, (x[:10], y[:10]), (x[10:13], y[10:13]), x


def test_posterior_rules_follow_the_documented_formulas():
    cfg = BIFConfig()
    assert auto_fields(cfg) == ["step_size", "gamma", "burn_in", "thin", "draws", "control_variate"]
    out = posterior_settings(cfg, n_beta=10.0, curvature=2.0, d=400, weight_norm=5.0, n_traced=30)
    spread = 400 / (RELATIVE_SPREAD * 5.0) ** 2
    assert out["gamma"] == pytest.approx(max(spread, PRIOR_DOMINANCE * 10.0 * 2.0))
    assert out["step_size"] == pytest.approx(min(4 * BIAS_TOLERANCE / (20.0 + out["gamma"]), 0.4 / out["gamma"]))
    assert out["burn_in"] == math.ceil(math.log(100.0) / (out["step_size"] * out["gamma"]))
    assert out["control_variate"] == "diagonal"
    # a sharp curvature makes the localization follow it; numbers given are kept
    sharp = posterior_settings(BIFConfig(step_size=1e-3), 10.0, 1e4, 400, 5.0, 30)
    assert sharp["gamma"] == pytest.approx(PRIOR_DOMINANCE * 10.0 * 1e4) and "step_size" not in sharp
    # the control variate only where its gradients fit in memory
    assert posterior_settings(cfg, 10.0, 2.0, 10**7, 5.0, 10**4)["control_variate"] is None


def test_thinning_and_draws_from_the_pilot_autocorrelation():
    rng = np.random.default_rng(0)
    r, chains, steps = 0.8, 4, 4000  # AR(1): τ = (1 + r)/(1 − r) = 9
    x = np.zeros((chains, steps, 20))
    for t in range(1, steps):
        x[:, t] = r * x[:, t - 1] + math.sqrt(1 - r * r) * rng.normal(size=(chains, 20))
    traces = torch.from_numpy(x)
    out = sampling_settings(BIFConfig(), traces, 30.0, 10.0, 1.0, 1.0, None)
    assert out["tau_steps"] == pytest.approx(9.0, rel=0.2)
    assert out["thin"] == best_thin(out["tau_steps"], 30.0, 10.0)
    rk = ((out["tau_steps"] - 1) / (out["tau_steps"] + 1)) ** out["thin"]
    assert out["draws"] == math.ceil(400 * (1 + rk) / (1 - rk) / chains)
    budget = sampling_settings(BIFConfig(), traces, 30.0, 10.0, 0.01, 0.02, 10.0)
    assert budget["draws"] == int(10.0 / (chains * (budget["thin"] * 0.01 + 0.02)))
    tiny = sampling_settings(BIFConfig(), traces, 30.0, 10.0, 0.01, 0.02, 0.01)
    assert tiny["draws"] == 20 and tiny["budget_too_small"]


@pytest.mark.slow
def test_default_call_configures_itself_reproducibly():
    model, loader, train, queries, x = problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BIFConfig(target_ess=100)  # every sampler setting auto (fewer effective draws: a fast test)
    runs = [bayesian_influence(model, _squared, loader, train, queries, config=cfg, progress=False) for _ in range(2)]
    a, b = runs
    assert torch.equal(a.bif, b.bif)  # work-based thinning: no timing enters the result
    cfg, t = a.config, a.tuning
    assert not auto_fields(cfg) and t["auto"] == list(auto_fields(BIFConfig()))
    assert t["curvature"] == pytest.approx(float(torch.linalg.eigvalsh(x.T @ x / 64).max()), rel=1e-3)
    assert cfg.gamma == pytest.approx(max(4 / (RELATIVE_SPREAD * t["weight_norm"]) ** 2,
                                          PRIOR_DOMINANCE * t["n_beta"] * t["curvature"]))
    assert cfg.step_size * cfg.gamma <= 0.4 + 1e-12 and cfg.control_variate == "diagonal"
    assert a.diagnostics.ess >= 0.5 * cfg.target_ess  # the draws aim at target_ess effective draws
    assert "auto settings" in a.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # given numbers are used as is; a half-auto config resolves the rest
    fixed = bayesian_influence(model, _squared, loader, train, queries, progress=False,
                               config=BIFConfig(step_size=1e-3, gamma=50.0, draws=30, thin=2, burn_in=5,
                                                control_variate=None))
    assert fixed.tuning is None and fixed.config.draws == 30
    half = bayesian_influence(model, _squared, loader, train, queries, progress=False,
                              config=BIFConfig(gamma=50.0, draws=30))
    assert half.config.gamma == 50.0 and half.config.draws == 30 and "tau_steps" in half.tuning


def test_a_budget_too_small_is_reported_not_hidden():
    """The budget arithmetic is checked exactly in the pure test above; end to end (timings on a
    shared machine vary), a budget that cannot hold 20 draws per chain runs 20 and says so."""
    model, loader, train, queries, _ = problem()
    res = bayesian_influence(model, _squared, loader, train, queries, progress=False,
                             config=BIFConfig(budget_s=1e-3))
    assert res.config.draws == 20 and res.tuning["budget_too_small"]
    assert "budget_s leaves fewer than 20 draws" in res.summary()


def test_unresolved_config_is_refused_where_numbers_are_needed():
    with pytest.raises(ConfigurationError, match="still 'auto'"):
        BIFConfig().steps_per_chain
    with pytest.raises(ConfigurationError, match="target_ess must be"):
        BIFConfig(target_ess=0)
