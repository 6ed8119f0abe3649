"""The sharded path in one process (a gloo group of one): values, refusals with what to use instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from inrun_shapley import ShapleyTracker
from inrun_shapley.errors import ConfigurationError
from tests.distributed import fsdp_setup

fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


@pytest.fixture
def group_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Gate(nn.Module):
    """A custom layer: scored by the generic forward-mode (JVP) rule, which replays it."""

    def __init__(self, d: int):
        super().__init__()
        self.g = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.g.tanh()


MAKE = fsdp_setup.make


def with_gate(kind, seed=0):
    model, blocks, train, val, loss_fn = MAKE(kind, seed)
    model.insert(2, Gate(24))
    return model, blocks, train, val, loss_fn


def shard(model, blocks):
    for b in blocks:
        fully_shard(b)
    fully_shard(model)


@pytest.mark.parametrize("own_unit", [False, True], ids=["inside-a-unit", "its-own-unit"])
def test_one_rank_fsdp_equals_plain_with_a_replayed_layer(group_of_one, monkeypatch, own_unit):
    monkeypatch.setattr(fsdp_setup, "make", with_gate)
    monkeypatch.setattr(fsdp_setup, "STEPS", 3)
    ref = fsdp_setup.train("mlp", group_values=True)
    wrap = (lambda model, blocks: shard(model, blocks + [model[2]])) if own_unit else shard
    sharded = fsdp_setup.train("mlp", shard=wrap, group_values=True)
    assert "jvp" in [row.rule for row in ref.report()]
    assert np.abs(sharded.values - ref.values).max() <= 1e-5 * np.abs(ref.values).max()
    assert np.abs(sharded.group_values - ref.group_values).max() <= 1e-5 * np.abs(ref.values).max()
    assert np.abs(ref.group_values[:, 2]).max() > 0  # the replayed layer's own part is there


def accumulated(sharded: bool, sync_every_micro_batch: bool) -> np.ndarray:
    """Values of 3 steps of 2 micro-batches each (FSDP: the first without gradient sync, or not)."""
    model, blocks, (x, y), val, loss_fn = fsdp_setup.make("mlp")
    if sharded:
        shard(model, blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=loss_fn)
    for ids in fsdp_setup.global_batches()[:3]:
        for k, part in enumerate(ids.tensor_split(2)):
            if sharded:
                model.set_requires_gradient_sync(sync_every_micro_batch or k == 1)
            with tracker.batch(part):
                (loss_fn(model, (x[part], y[part])).mean() / 2).backward()
        opt.step()
        opt.zero_grad()
    tracker.detach()
    assert tracker.skipped_steps == 0
    return tracker.values


@pytest.mark.parametrize("sync", [True, False], ids=["sync-each", "sync-last"])
def test_gradient_accumulation_under_fsdp(group_of_one, sync):
    ref = accumulated(False, True)
    values = accumulated(True, sync)
    assert len(values) == len(ref) and np.abs(values - ref).max() <= 1e-5 * np.abs(ref).max()


def sharded_model(kind="mlp"):
    model, blocks, _, val, loss_fn = fsdp_setup.make(kind)
    shard(model, blocks)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), val, loss_fn


@pytest.mark.parametrize("options, message", [
    (dict(per_query=True), "per_query"),
    (dict(order=2, estimator="shapley"), "order=2"),
])
def test_options_without_a_sharded_form_are_refused(group_of_one, options, message):
    model, opt, val, loss_fn = sharded_model()
    with pytest.raises(ConfigurationError, match=message):
        ShapleyTracker(model, opt, val_data=val, val_loss_fn=loss_fn, **options)


class ZeroOptimizer:
    """Stands for DeepSpeed's ZeRO optimizer: wraps a torch optimizer, lives in ``deepspeed.*``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups


ZeroOptimizer.__module__ = "deepspeed.runtime.zero.stage_1_and_2"


def test_deepspeed_is_refused_with_what_to_use_instead():
    model = nn.Linear(3, 2)
    opt = ZeroOptimizer(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ConfigurationError, match="DeepSpeed.*fully_shard.*ModelParallelStrategy"):
        ShapleyTracker(model, opt, val_data=(torch.randn(4, 3), torch.randn(4, 2)))


def test_fsdp1_flattened_parameters_are_refused():
    model = nn.Linear(3, 2)
    model.weight._fsdp_flattened = True  # what FullyShardedDataParallel marks its FlatParameters with
    with pytest.raises(ConfigurationError, match="FSDP1.*fully_shard"):
        ShapleyTracker(model, torch.optim.AdamW(model.parameters()), val_data=(torch.randn(4, 3), torch.randn(4, 2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs a CUDA device")
def test_fsdp1_module_is_refused_on_gpu(group_of_one):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).cuda())
    with pytest.raises(ConfigurationError, match="FSDP1"):
        ShapleyTracker(model, torch.optim.AdamW(model.parameters()),
                       val_data=(torch.randn(4, 3).cuda(), torch.randn(4, 2).cuda()))
