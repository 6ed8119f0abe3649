"""The coupled-chain control variate (inrun_shapley.posthoc.bif.control_variate).

On a linear-Gaussian model (full-batch SGLD is then an exact Gaussian AR(1) process with a
closed-form stationary covariance) the control variate Z = Ĉov_plain − Ĉov_cv must have mean 0
over sampler seeds (it adds no bias, from the first step: no stationarity assumed), the corrected
estimate must agree with the closed form, and its spread over seeds must be smaller.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence
from inrun_shapley.posthoc.bif.control_variate import CoupledGaussianCV

F64 = torch.float64


def _squared(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _linear_gaussian():
    n, d = 40, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, dtype=F64, generator=g)
    y = x @ torch.randn(d, dtype=F64, generator=g) + 0.5 * torch.randn(n, dtype=F64, generator=g)
    w_star = torch.linalg.solve(x.T @ x, x.T @ y)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star[None])
    a = torch.randn(3, d, dtype=F64, generator=g)
    n_beta, gamma = 20.0, 200.0  # the large-γ regime the BIF is used in
    precision = n_beta / n * x.T @ x + gamma * torch.eye(d, dtype=F64)
    eps = 0.5 / float(torch.linalg.eigvalsh(precision).max())
    eye = torch.eye(d, dtype=F64)
    stationary = torch.linalg.inv(precision) @ torch.linalg.inv(eye - eps * precision / 4)
    exact = (x @ w_star - y)[:, None] * (x @ stationary @ a.T)  # Cov(ℓ_i, a_qᵀw), exact (ULA)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    return model, loader, (x, y), a, exact, dict(step_size=eps, n_beta=n_beta, gamma=gamma)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prior", "diagonal"])
def test_control_variate_is_unbiased_and_reduces_variance_on_linear_gaussian(kind):
    model, loader, train, a, exact, post = _linear_gaussian()
    plain, corrected = [], []
    for seed in range(30):
        common = dict(**post, chains=2, draws=40, burn_in=5, thin=2, seed=seed, trace_dtype=F64)
        kwargs = dict(config=None, observable_fn=lambda m, b: m(b).squeeze(-1), progress=False)
        kwargs["config"] = BIFConfig(**common, control_variate=None)
        p = bayesian_influence(model, _squared, loader, train, a, **kwargs)
        kwargs["config"] = BIFConfig(**common, control_variate=kind)
        c = bayesian_influence(model, _squared, loader, train, a, **kwargs)
        plain.append(-p.bif)
        corrected.append(-c.bif)
    plain, corrected = torch.stack(plain), torch.stack(corrected)  # [seeds, n, q] of Cov estimates
    z = plain - corrected  # the control variate itself (same chains)
    m = z.shape[0]
    # E[Z] = 0: the mean over 30 seeds is within Monte-Carlo error, entry by entry and overall
    t = z.mean(0) / (z.std(0) / m**0.5)
    assert float(t.abs().max()) < 4.5, float(t.abs().max())
    assert abs(float(t.mean())) < 4 / t.numel() ** 0.5 * 2, float(t.mean())
    # the corrected estimator is closer to the closed form and varies less over seeds
    err_plain = float((plain - exact).norm(dim=(1, 2)).mean() / exact.norm())
    err_cv = float((corrected - exact).norm(dim=(1, 2)).mean() / exact.norm())
    spread_plain = float(plain.std(0).norm() / exact.norm())
    spread_cv = float(corrected.std(0).norm() / exact.norm())
    print(f"{kind}: error {err_plain:.3f} -> {err_cv:.3f}, spread {spread_plain:.3f} -> {spread_cv:.3f}")
    assert spread_cv < 0.7 * spread_plain
    assert err_cv < 0.7 * err_plain
    # mean over seeds of the corrected estimate agrees with the exact covariance
    bias = float((corrected.mean(0) - exact).norm() / exact.norm())
    assert bias < 0.1, bias


def test_coupled_chain_variance_is_exact_in_closed_form():
    """The closed form Var(u_t) = ε(1 − ρ^{2t})/(1 − ρ²) against 20,000 simulated coupled chains."""
    d, chains, eps, gamma = 3, 20000, 0.01, 30.0
    grad = torch.eye(d, dtype=F64)
    cv = CoupledGaussianCV("prior", grad, grad, chains, eps, gamma, n_beta=1.0)
    g = torch.Generator().manual_seed(0)
    for t in range(25):
        cv.step(torch.randn(chains, d, dtype=F64, generator=g))
    cv.record()
    rho = 1 - eps * gamma / 2
    expected = eps * (1 - rho ** 50) / (1 - rho**2)
    empirical = (cv.u**2).mean(0)
    assert torch.allclose(empirical, torch.full((d,), expected, dtype=F64), rtol=0.05)
    z = cv.correction()
    assert float(z.abs().max()) < 0.05 * expected  # off-diagonals ~0, diagonal = empirical − exact


def test_control_variate_settings_are_checked():
    with pytest.raises(ConfigurationError, match="control_variate"):
        BIFConfig(control_variate="full")
    with pytest.raises(ConfigurationError, match="gamma > 0"):
        BIFConfig(control_variate="prior", gamma=0.0)
    grad = torch.ones(2, 3, dtype=F64)
    cv = CoupledGaussianCV("diagonal", grad, grad, 1, step_size=1.0, gamma=10.0, n_beta=5.0)
    assert bool((cv.rho >= 0).all()) and bool((cv.rho < 1).all())  # λ capped at 2/ε
    np.testing.assert_allclose(cv.precision.numpy(), 2.0)
