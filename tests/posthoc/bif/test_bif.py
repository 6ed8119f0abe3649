"""Tests of the Bayesian Influence Function (inrun_shapley.posthoc.bif).

Known answers: a linear-Gaussian model whose SGLD stationary law is exactly Gaussian (closed-form
covariance, including the step-size bias of unadjusted Langevin), linear regression with query
losses against the closed-form posterior, and L2-regularized logistic regression on digits
against the exact damped influence function (Hessian by torch.func). Then the contract:
online == in-memory, divergence, parameter subsets, restoring the model, seeds, bad inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley.posthoc.bif import (
    BIFConfig,
    bayesian_influence,
    effective_sample_size,
    rank_stability,
    split_rhat,
)
from inrun_shapley.errors import ConfigurationError, NonFiniteError
from inrun_shapley.metrics import pearson, spearman

torch.set_num_threads(1)
F64 = torch.float64


def squared_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def linear_problem(n: int, d: int, seed: int, noise: float = 0.5):
    """Least-squares fit (w* = exact minimizer) of a bias-free linear model, fp64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=F64, generator=g)
    y = x @ torch.randn(d, dtype=F64, generator=g) + noise * torch.randn(n, dtype=F64, generator=g)
    w_star = torch.linalg.solve(x.T @ x, x.T @ y)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star[None])
    return model, x, y, w_star


# ------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_linear_gaussian_matches_exact_stationary_covariance():
    """Full-batch SGLD on ½(xᵀw − y)² is a Gaussian AR(1) process with a closed-form law.

    Potential U(w) = nβ·L_n(w) + γ/2‖w − w*‖² has precision Λ = (nβ/n)·XᵀX + γI and mean w*
    (w* = least squares). Unadjusted Langevin with step ε has the stationary covariance
    S = Λ⁻¹(I − εΛ/4)⁻¹ (solve S = A S A + εI, A = I − εΛ/2). With linear observables
    φ_q = a_qᵀw and ℓ_i = ½(r_i + x_iᵀδ)²: Cov(ℓ_i, φ_q) = r_i · x_iᵀ S a_q exactly (odd
    Gaussian moments vanish), r_i = x_iᵀw* − y_i.
    """
    n, d = 40, 4
    model, x, y, w_star = linear_problem(n, d, seed=0)
    a = torch.randn(6, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    n_beta, gamma = 20.0, 20.0
    precision = n_beta / n * x.T @ x + gamma * torch.eye(d, dtype=F64)
    eps = 1.0 / float(torch.linalg.eigvalsh(precision).max())  # fast mixing; bias handled exactly
    stationary = torch.linalg.inv(precision) @ torch.linalg.inv(torch.eye(d, dtype=F64) - eps * precision / 4)
    residual = x @ w_star - y
    exact_cov = residual[:, None] * (x @ stationary @ a.T)

    cfg = BIFConfig(step_size=eps, n_beta=n_beta, gamma=gamma, chains=4, draws=1500, burn_in=50, thin=1,
                    control_variate=None, seed=0, trace_dtype=F64)
    res = bayesian_influence(model, squared_loss, DataLoader(TensorDataset(x, y), batch_size=n),
                             (x, y), a, config=cfg, observable_fn=lambda m, b: m(b).squeeze(-1),
                             progress=False)
    rel = float((-res.bif - exact_cov).norm() / exact_cov.norm())
    # Monte Carlo error at ~1000-3000 effective draws is ~4 %; the ULA bias alone would be 17-25 %.
    assert rel < 0.1, rel
    assert res.bif.shape == (n, 6)
    assert abs(res.diagnostics.rhat - 1) < 0.05
    assert res.diagnostics.ess > 500


@pytest.mark.slow
def test_linear_regression_query_losses_match_closed_form_posterior():
    """Minibatch SGLD, φ_q = query loss; Gaussian posterior N(w*, Σ), Σ = (nβ/n·XᵀX + γI)⁻¹.

    With s_iq = x_iᵀΣx_q and residuals r: Cov(ℓ_i, ℓ_q) = r_i·r_q·s_iq + ½·s_iq² (Isserlis).
    """
    n, d = 64, 6
    model, x, y, w_star = linear_problem(n, d, seed=1)
    g = torch.Generator().manual_seed(2)
    xq = torch.randn(8, d, dtype=F64, generator=g)
    yq = xq @ w_star + torch.randn(8, dtype=F64, generator=g)
    n_beta, gamma = 64.0, 30.0
    sigma = torch.linalg.inv(n_beta / n * x.T @ x + gamma * torch.eye(d, dtype=F64))
    s = x @ sigma @ xq.T
    exact_cov = (x @ w_star - y)[:, None] * (xq @ w_star - yq)[None, :] * s + 0.5 * s**2

    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    cfg = BIFConfig(step_size=4e-3, n_beta=n_beta, gamma=gamma, chains=4, draws=1200, burn_in=100,
                    thin=2, seed=0, control_variate=None)
    res = bayesian_influence(model, squared_loss, loader, (x, y), (xq, yq), config=cfg, progress=False)
    r = pearson(-res.bif.numpy(), exact_cov.numpy())
    # ≈ 0.997 over sampler seeds 0-3 (0.998-0.999 with 5x the draws: the gap is Monte Carlo error).
    print(f"linear regression: Pearson(BIF, closed form) = {r:.4f}")
    assert r >= 0.99, r

    # Sign and scale of .influence: raising sample i's weight in exp(−β·Σ_j w_j·ℓ_j) by dw moves
    # the exact posterior mean of φ_q by β·BIF[i, q]·dw. Finite differences of the closed form:
    beta, dw = n_beta / n, 1e-4
    def mean_query_loss(weights):
        precision = beta * (x.T * weights) @ x + gamma * torch.eye(d, dtype=F64)
        cov = torch.linalg.inv(precision)
        mean = cov @ (beta * (x.T * weights) @ y + gamma * w_star)
        return 0.5 * ((xq @ mean - yq) ** 2 + ((xq @ cov) * xq).sum(dim=1))
    base = mean_query_loss(torch.ones(n, dtype=F64))
    derivative = torch.stack([(mean_query_loss(1 + dw * torch.eye(n, dtype=F64)[i]) - base) / dw
                              for i in range(n)])
    assert torch.allclose(-beta * exact_cov, derivative, rtol=1e-3, atol=1e-7)  # identity holds
    r_influence = pearson(res.influence.numpy(), derivative.numpy())
    assert r_influence >= 0.99, r_influence


@pytest.fixture(scope="module")
def digits_logistic():
    """L2-regularized logistic regression, digits 3 vs 8, 64 pixels + bias, fp64, exact fit."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    keep = (labels == 3) | (labels == 8)
    x = torch.tensor(images[keep] / 16.0, dtype=F64)
    y = torch.tensor((labels[keep] == 8).astype(np.float64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, qu = perm[:200], perm[200:220]
    torch.manual_seed(0)
    model = nn.Linear(64, 1).double()

    def loss_fn(m, batch):
        xb, yb = batch
        return nn.functional.binary_cross_entropy_with_logits(m(xb).squeeze(-1), yb, reduction="none")

    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, (x[tr], y[tr])).mean() + 0.5e-2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model, loss_fn, (x[tr], y[tr]), (x[qu], y[qu])


def damped_influence(model, loss_fn, train, queries, n_beta, gamma):
    """Exact −∇φ_qᵀ(nβ·H + γI)⁻¹∇ℓ_i with H the Hessian of the mean training loss at w*."""
    from torch.func import functional_call, hessian, jacrev

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def per_sample(w, batch):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            params[name] = w[i : i + k].reshape(shape)
            i += k
        return loss_fn(lambda inp: functional_call(model, params, (inp,)), batch)

    h = hessian(lambda w: per_sample(w, train).mean())(w0)
    g_train = jacrev(lambda w: per_sample(w, train))(w0)
    g_query = jacrev(lambda w: per_sample(w, queries))(w0)
    return -(g_train @ torch.linalg.solve(n_beta * h + gamma * torch.eye(len(w0), dtype=F64), g_query.T))


@pytest.mark.slow
def test_logistic_digits_matches_damped_influence_function(digits_logistic):
    model, loss_fn, train, queries = digits_logistic
    n_beta, gamma = 200.0, 100.0
    exact = damped_influence(model, loss_fn, train, queries, n_beta, gamma)
    loader = DataLoader(TensorDataset(*train), batch_size=50, shuffle=True)
    results = []
    for seed in (0, 1):
        cfg = BIFConfig(step_size=2e-3, n_beta=n_beta, gamma=gamma, chains=4, draws=300, burn_in=100,
                        thin=3, seed=seed, control_variate=None)
        results.append(bayesian_influence(model, loss_fn, loader, train, queries, config=cfg, progress=False))
    per_query = [spearman(results[0].bif[:, q], exact[:, q]) for q in range(exact.shape[1])]
    stability = rank_stability(results[0], results[1])
    print(f"digits logistic: mean per-query Spearman(BIF, damped IF) = {np.mean(per_query):.4f}, "
          f"Pearson = {pearson(results[0].bif, exact):.4f}, seed-to-seed rank stability = {stability:.4f}")
    assert np.mean(per_query) >= 0.9
    assert 0.5 < stability <= 1.0
    # influence = β·BIF with β = nβ/n
    assert torch.allclose(results[0].influence, results[0].bif * n_beta / 200)


# ------------------------------------------------------------------------------------------
# Diagnostics (pure functions)
# ------------------------------------------------------------------------------------------


def test_rhat_and_ess_known_answers():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(4, 2000, generator=g, dtype=F64)
    assert abs(float(split_rhat(iid)) - 1) < 0.01
    assert 0.8 * 8000 < float(effective_sample_size(iid)) < 1.2 * 8000
    # AR(1) with coefficient ρ: integrated autocorrelation time (1 + ρ)/(1 − ρ) = 3 at ρ = 0.5.
    rho, ar = 0.5, torch.zeros(4, 4000, dtype=F64)
    noise = torch.randn(4, 4000, generator=g, dtype=F64)
    ar[:, 0] = noise[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, 4000):
        ar[:, t] = rho * ar[:, t - 1] + noise[:, t]
    assert abs(float(effective_sample_size(ar)) / (16000 / 3) - 1) < 0.15
    shifted = iid + torch.arange(4, dtype=F64)[:, None]
    assert float(split_rhat(shifted)) > 1.5
    drifting = iid + torch.linspace(0, 5, 2000, dtype=F64)  # halves disagree within each chain
    assert float(split_rhat(drifting)) > 1.3  # ≈ 1.47; R̂ without the split would be ≈ 1
    assert split_rhat(torch.randn(2, 10, 3)).shape == (3,)
    assert effective_sample_size(torch.randn(2, 10, 3)).shape == (3,)
    assert math.isnan(float(split_rhat(torch.ones(2, 10))))


# ------------------------------------------------------------------------------------------
# Contract
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def small_problem():
    model, x, y, _ = linear_problem(48, 3, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=12, shuffle=True)
    return model, loader, (x[:10], y[:10]), (x[10:14], y[10:14])


FAST = dict(step_size=2e-3, n_beta=12.0, gamma=50.0, chains=2, draws=40, burn_in=10, thin=1, control_variate=None)


def test_online_accumulation_equals_in_memory(small_problem):
    model, loader, train, queries = small_problem
    a = bayesian_influence(model, squared_loss, loader, train, queries,
                           config=BIFConfig(**FAST, online=False), progress=False)
    b = bayesian_influence(model, squared_loss, loader, train, queries,
                           config=BIFConfig(**FAST, online=True), progress=False)
    c = bayesian_influence(model, squared_loss, loader, train, queries,
                           config=BIFConfig(**FAST, max_traces_in_memory=10), progress=False)
    assert not a.online and b.online and c.online
    torch.testing.assert_close(a.bif, b.bif, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(a.correlation, b.correlation, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.bif, c.bif, rtol=0, atol=0)
    assert a.diagnostics.ess_per_sample is not None and b.diagnostics.ess_per_sample is None


def test_divergence_raises_and_restores_model(small_problem):
    model, loader, train, queries = small_problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BIFConfig(step_size=1.0, n_beta=1e3, gamma=1e3, chains=2, draws=20)
    with pytest.raises(NonFiniteError) as info:
        bayesian_influence(model, squared_loss, loader, train, queries, config=cfg, progress=False)
    message = str(info.value)
    assert "chain 0" in message and "step_size" in message and "gamma" in message
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_restored_and_untouched(small_problem):
    model, loader, train, queries = small_problem
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    bayesian_influence(model, squared_loss, loader, train, queries, config=BIFConfig(**FAST), progress=False)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_params_subset_leaves_other_parameters_at_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(32, 3, dtype=F64), torch.randn(32, dtype=F64)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {"moved": 0, "draws": 0}

    def observable(m, batch):
        seen["draws"] += 1
        assert torch.equal(m[0].weight, w0["0.weight"]) and torch.equal(m[0].bias, w0["0.bias"])
        seen["moved"] += int(not torch.equal(m[2].weight, w0["2.weight"]))
        assert not m.training
        return squared_loss(m, batch)

    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    for params in (["2"], lambda name, p: name.startswith("2.")):
        seen.update(moved=0, draws=0)
        res = bayesian_influence(model, squared_loss, loader, (x[:6], y[:6]), (x[6:9], y[6:9]),
                                 config=BIFConfig(**FAST), observable_fn=observable, params=params,
                                 progress=False)
        assert seen["moved"] == seen["draws"] - 1 > 0  # the reference pass at w* is the extra call
        assert res.bif.shape == (6, 3)


def test_seed_determinism_and_rank_stability(small_problem):
    model, loader, train, queries = small_problem
    runs = [bayesian_influence(model, squared_loss, loader, train, queries,
                               config=BIFConfig(**FAST, seed=s), progress=False) for s in (7, 7, 8)]
    assert torch.equal(runs[0].bif, runs[1].bif)
    assert torch.equal(runs[0].diagnostics.sgld_loss, runs[1].diagnostics.sgld_loss)
    assert not torch.equal(runs[0].bif, runs[2].bif)
    stability = runs[0].rank_stability(runs[2])
    assert -1.0 <= stability <= 1.0
    assert rank_stability(runs[0], runs[1]) == pytest.approx(1.0)


def test_per_token_observables_and_summary(small_problem):
    model, loader, train, _ = small_problem
    xq = torch.randn(3, 5, 3, dtype=F64)  # 3 query "sequences" of 5 tokens

    def token_losses(m, batch):
        return 0.5 * m(batch).squeeze(-1) ** 2  # [B, T]

    res = bayesian_influence(model, squared_loss, loader, train, xq, config=BIFConfig(**FAST),
                             observable_fn=token_losses, progress=False)
    assert res.bif.shape == (10, 3, 5) and res.correlation.shape == (10, 3, 5)
    assert res.influence.shape == (10, 3, 5)
    assert torch.all(res.correlation.abs() <= 1 + 1e-9)
    text = res.summary()
    assert "split-R-hat" in text and "ESS" in text and "drift" in text
    assert repr(res).startswith("BIFResult(bif=(10, 3, 5), ") and "\n" not in repr(res) and len(repr(res)) < 160
    d = res.diagnostics
    assert d.loss_trace.shape == (2, 40) and d.sgld_loss.shape == (2, 50) and d.drift.shape == (2, 40)
    assert d.drift_fraction == pytest.approx(float(d.drift.mean()))


def test_default_n_beta_from_batch_size(small_problem):
    model, loader, train, queries = small_problem
    cfg = BIFConfig(**{**FAST, "n_beta": None})
    res = bayesian_influence(model, squared_loss, loader, train, queries, config=cfg, progress=False)
    assert res.n_beta == pytest.approx(12 / math.log(12))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step_size=0.0), "step_size must be a positive"),
        (dict(step_size=float("nan")), "step_size must be a positive"),
        (dict(gamma=-1.0), "gamma must be 'auto' or a finite number >= 0"),
        (dict(n_beta=-2.0), "n_beta must be a positive"),
        (dict(chains=0), "chains must be a positive integer"),
        (dict(draws=3), "draws must be 'auto' or an integer >= 4"),
        (dict(burn_in=-1), "burn_in must be 'auto', None or an integer >= 0"),
        (dict(budget_s=0.0), "budget_s must be a positive"),
        (dict(thin=0), "thin must be a positive integer"),
        (dict(online="yes"), "online must be None, True or False"),
        (dict(trace_dtype=torch.int32), "trace_dtype must be a floating"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        BIFConfig(**kwargs)


def test_bad_inputs(small_problem):
    model, loader, train, queries = small_problem
    cfg = BIFConfig(**FAST)
    cases = [
        (dict(params=["nope"]), "no parameter or module named"),
        (dict(params=lambda n, p: False), "matched no parameter"),
        (dict(loss=lambda m, b: squared_loss(m, b).mean()), "per-sample"),
        (dict(train=DataLoader(TensorDataset(*train), batch_size=4, shuffle=True)), "shuffle=False"),
        (dict(config=BIFConfig(**FAST, params=["weight"]), params=["weight"]), "pass one"),
    ]
    for case, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            bayesian_influence(model, case.get("loss", squared_loss), loader, case.get("train", train),
                               queries, config=case.get("config", cfg), params=case.get("params"),
                               progress=False)
