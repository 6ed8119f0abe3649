"""Chains run together (batched=True) are the sequential chains; index-read loaders give the
collated batches; settings chosen from diagnostics (tuning.best_thin, choose_config)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence, best_thin, choose_config
from inrun_shapley.posthoc.bif.sampler import cycle

F64 = torch.float64


def _squared(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _problem(batch_size=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(50, 3, dtype=F64), torch.randn(50, dtype=F64)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)  # last batch of 2
    return model, loader, (x[:10], y[:10]), (x[10:14], y[10:14])


FAST = dict(step_size=2e-3, n_beta=12.0, gamma=50.0, chains=3, draws=30, burn_in=5, thin=2, seed=3)


@pytest.mark.parametrize("control_variate", [None, "diagonal"])
def test_batched_chains_equal_sequential_chains(control_variate):
    model, loader, train, queries = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    for batched in (False, True):
        cfg = BIFConfig(**FAST, batched=batched, control_variate=control_variate)
        runs[batched] = bayesian_influence(model, _squared, loader, train, queries, config=cfg, progress=False)
    seq, bat = runs[False], runs[True]
    assert bat.batched and not seq.batched
    # same noise, same minibatches per chain: equal up to rounding of the vmapped gradient
    torch.testing.assert_close(bat.bif, seq.bif, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bat.diagnostics.sgld_loss, seq.diagnostics.sgld_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bat.diagnostics.drift, seq.diagnostics.drift, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert bat.draws_per_second > 0


def test_batched_refuses_or_falls_back_for_a_model_vmap_cannot_run():
    model, loader, train, queries = _problem()

    def observable(m, batch):  # .item() cannot run under vmap
        out = _squared(m, batch)
        return out * (1.0 + 0.0 * out.sum().item())

    with pytest.raises(ConfigurationError, match="batched=False"):
        bayesian_influence(model, _squared, loader, train, queries, observable_fn=observable,
                           config=BIFConfig(**FAST, batched=True, control_variate=None), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = bayesian_influence(model, _squared, loader, train, queries, observable_fn=observable,
                                 config=BIFConfig(**FAST, batched=None, control_variate=None), progress=False)
    assert not res.batched and any("one after another" in str(w.message) for w in caught)


def test_tensor_dataset_loader_read_by_index_gives_the_collated_batches():
    x, y = torch.randn(23, 2), torch.arange(23)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)

    class Opaque:
        def __iter__(self):
            return iter(loader)

    torch.manual_seed(1)
    fast = cycle(loader)
    a = [next(fast) for _ in range(12)]  # crosses two epoch boundaries (5 batches per epoch)
    torch.manual_seed(1)
    plain = cycle(Opaque())
    b = [next(plain) for _ in range(12)]
    assert all(type(u) is type(v) and all(torch.equal(s, t) for s, t in zip(u, v)) for u, v in zip(a, b))


def test_best_thin_known_answers():
    assert best_thin(1.0, step_seconds=1e-3, draw_seconds=1e-3) == 1  # independent steps: keep all
    assert best_thin(50.0, step_seconds=1e-3, draw_seconds=0.0) == 1  # free draws: never thin
    k = best_thin(50.0, step_seconds=1e-3, draw_seconds=2e-2)
    assert 5 <= k <= 50  # costly draws, slow mixing: thin
    assert best_thin(50.0, 1e-3, 2e-1) >= k


def test_choose_config_step_size_from_curvature():
    """Linear least squares, full batch: H = XᵀX/n exactly, so ε = 4·tol/(nβ·λ_max(H) + γ)."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, dtype=F64), torch.randn(40, dtype=F64)
    model = nn.Linear(3, 1, bias=False).double()
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    base = BIFConfig(n_beta=20.0, gamma=30.0, chains=2, draws=20)
    cfg, report = choose_config(model, _squared, loader, (x[:8], y[:8]), (x[8:10], y[8:10]), base=base,
                                bias_tolerance=0.05, pilot_draws=40)
    lam = float(torch.linalg.eigvalsh(x.T @ x / 40).max())
    assert report["curvature"] == pytest.approx(lam, rel=2e-3)  # 30 power iterations
    assert cfg.step_size == pytest.approx(0.2 / (20.0 * report["curvature"] + 30.0), rel=1e-9)
    assert cfg.burn_in >= 1 and cfg.thin >= 1 and cfg.n_beta == 20.0 and cfg.gamma == 30.0
