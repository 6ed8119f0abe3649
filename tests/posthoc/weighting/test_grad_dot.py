"""Per-sample-gradient pieces behind compute_group_components
(inrun_shapley.posthoc.weighting.grad_dot, and checkpoint validation in components)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.weighting import ParameterGroups, compute_group_components
from inrun_shapley.posthoc.weighting.grad_dot import (
    batched_grads,
    flatten_by_group,
    group_projections,
    per_sample_grad_fn,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data(n: int = 7):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_projections_are_seeded_per_group_and_identity_when_wide():
    model = _model()
    groups = ParameterGroups.per_module(model)  # sizes 16 and 10
    state = dict(model.named_parameters())
    narrow = group_projections(groups, state, 12, seed=3)
    assert narrow[0].shape == (16, 12) and narrow[1] is None
    again = group_projections(groups, state, 12, seed=3)
    assert torch.equal(narrow[0], again[0])
    assert not torch.equal(narrow[0], group_projections(groups, state, 12, seed=4)[0])
    assert group_projections(groups, state, None, seed=3) == [None, None]


def test_flatten_by_group_follows_group_then_model_order():
    model = _model()
    groups = ParameterGroups.by_pattern(model, {r"bias": "biases", r"weight": "weights"})
    per_param = {n: p.detach().unsqueeze(0) for n, p in model.named_parameters()}
    biases, weights = flatten_by_group(per_param, groups, 1)
    assert torch.equal(biases[0], torch.cat([model[0].bias, model[2].bias]).detach())
    assert torch.equal(weights[0], torch.cat([model[0].weight.reshape(-1), model[2].weight.reshape(-1)]).detach())
    assert biases.dtype == torch.float64


def test_batched_grads_match_one_call_and_autograd():
    model = _model()
    x, y = _data()
    params = {n: p.detach() for n, p in model.named_parameters()}
    fn = per_sample_grad_fn(model, F.cross_entropy)
    whole = fn(params, {}, x, y)
    chunked = batched_grads(fn, params, {}, x, y, batch_size=3)
    assert all(torch.allclose(whole[n], chunked[n], rtol=0, atol=1e-14) for n in params)
    model.zero_grad()
    F.cross_entropy(model(x[4:5]), y[4:5]).backward()
    assert torch.allclose(chunked["2.weight"][4], model[2].weight.grad, rtol=0, atol=1e-14)


def test_one_preconditioner_per_checkpoint_is_required():
    model = _model()
    x, y = _data()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    ones = {n: torch.ones_like(p) for n, p in state.items()}
    with pytest.raises(ConfigurationError, match=r"preconditioner: expected 2 entries \(one per checkpoint\), got 1"):
        compute_group_components(model, F.cross_entropy, (x, y), (x, y), checkpoints=[state, state], preconditioner=[ones])
