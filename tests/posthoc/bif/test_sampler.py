"""SGLD sampler pieces (inrun_shapley.posthoc.bif.sampler): parameter selection, seeds, and
putting the user's model back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif.sampler import ModelSnapshot, chain_seed, cycle, select_params


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


@pytest.mark.parametrize(
    "selection, names",
    [
        (None, ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]),
        ("2", ["2.weight", "2.bias"]),
        (["0.weight", "2"], ["0.weight", "2.weight", "2.bias"]),
        (lambda n, p: n.endswith("bias"), ["0.bias", "1.bias", "2.bias"]),
    ],
    ids=["all-trainable", "module-prefix", "names-and-prefix", "predicate"],
)
def test_select_params(selection, names):
    assert [n for n, _ in select_params(_model(), selection)] == names


@pytest.mark.parametrize(
    "selection, message",
    [("3", r"no parameter or module named \['3'\]"), (lambda n, p: False, "matched no parameter")],
)
def test_select_params_errors(selection, message):
    with pytest.raises(ConfigurationError, match=message):
        select_params(_model(), selection)


def test_frozen_parameters_are_not_sampled_by_default():
    model = _model()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in [n for n, _ in select_params(model, None)]


def test_snapshot_restores_parameters_buffers_flags_and_modes():
    model = _model().train()
    model[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = ModelSnapshot(model, select_params(model, "2"))
    snapshot.enter_sampling_mode()
    assert not model.training and not model[1].training
    assert [p.requires_grad for p in model.parameters()] == [False] * 4 + [True] * 2
    with torch.no_grad():
        model[2].weight.add_(1.0)
        model[1].running_mean.add_(3.0)
    assert snapshot.distance() == pytest.approx(2.0)  # 4 entries moved by 1
    snapshot.restore()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model[1].training
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True, True]


def test_chain_seeds_differ_across_chains_and_base_seeds():
    seeds = {chain_seed(s, c) for s in range(3) for c in range(4)}
    assert len(seeds) == 12
    assert chain_seed(7, 1) == chain_seed(7, 1)


def test_cycle_restarts_the_loader_and_refuses_an_empty_one():
    batches = cycle([1, 2])
    assert [next(batches) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ConfigurationError, match="yielded no batch"):
        next(cycle([]))
