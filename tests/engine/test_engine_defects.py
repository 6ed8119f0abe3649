"""Engine defects fixed with the split: the model's parameters are never written, out-of-memory
is never swallowed by a loop fallback, and trackers suspend only themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker
from inrun_shapley.engine import batched as batched_module
from inrun_shapley.engine import validation as validation_module
from inrun_shapley.engine.directions import Estimator
from inrun_shapley.errors import ConfigurationError


def _mse_rows(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).flatten(1).mean(1)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
    val = (torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g))
    return x, y, val


@pytest.mark.parametrize("per_query", [False, True])
def test_second_order_never_writes_the_parameters(per_query):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y, val = _data()
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, order=2, per_query=per_query,
                             estimator="shapley")
    seen = []  # (version, value) of the real Parameter at every forward during opt.step()
    in_step = [False]
    weight = model[0].weight
    model[0].register_forward_pre_hook(
        lambda m, a: seen.append((weight._version, weight.detach().clone())) if in_step[0] else None)
    for step in range(2):
        with tracker.batch(torch.arange(6)):
            F.mse_loss(model(x), y).backward()
        in_step[0] = True
        opt.step()
        in_step[0] = False
        after = (weight._version, weight.detach().clone())
        assert seen, "the validation pass ran no forward"
        for version, value in seen:  # all in the post-hook, after the update: theta_{t+1} seen
            assert version == after[0]
            assert torch.equal(value, after[1])
        seen.clear()
        opt.zero_grad()
    tracker.detach()


def test_out_of_memory_in_the_batched_backward_is_raised(monkeypatch):
    real_grad = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    w = torch.randn(3, requires_grad=True)
    flat = (torch.randn(4, 3) @ w).tanh()
    with pytest.raises(torch.OutOfMemoryError):
        validation_module._per_query_grads(flat, [w])


class _NoBatchingRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2 + 0.0 * g.sum().item()  # .item(): no batching rule


def test_missing_batching_rule_falls_back_to_a_loop_with_one_warning():
    batched_module._warned.discard("per-query validation gradients")
    w = torch.randn(3, requires_grad=True)
    flat = _NoBatchingRule.apply(torch.randn(4, 3) * w).sum(1)
    with pytest.warns(RuntimeWarning, match="falling back to one backward per query"):
        (got,) = validation_module._per_query_grads(flat, [w])
    ref = torch.stack([torch.autograd.grad(f, w, retain_graph=True)[0] for f in flat])
    torch.testing.assert_close(got, ref)


def test_other_runtime_errors_are_not_batching_failures():
    assert batched_module.is_batching_failure(RuntimeError("Batching rule not implemented for aten::item."))
    assert not batched_module.is_batching_failure(RuntimeError("CUDA out of memory (vmap)"))
    assert not batched_module.is_batching_failure(torch.OutOfMemoryError("batched"))
    assert not batched_module.is_batching_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def _run_alone(estimator, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y, val = _data()
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, estimator=estimator)
    for _ in range(steps):
        tr.begin_batch(torch.arange(6))

        def closure():
            F.mse_loss(model(x), y).backward()
            tr.after_backward()

        opt.step(closure)
        opt.zero_grad()
    return tr.values


def test_two_trackers_on_one_model_do_not_interfere():
    """Lightning's order: the batch is open while the step pre-hook runs each tracker's validation
    pass; neither tracker may capture the other's pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y, val = _data()
    a = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, estimator="shapley")
    b = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, estimator="sgd")
    for _ in range(3):
        a.begin_batch(torch.arange(6))
        b.begin_batch(torch.arange(6))

        def closure():
            F.mse_loss(model(x), y).backward()
            a.after_backward()
            b.after_backward()

        opt.step(closure)
        opt.zero_grad()
    np.testing.assert_allclose(a.values, _run_alone("shapley"), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(b.values, _run_alone("sgd"), rtol=1e-6, atol=1e-12)


def test_suspending_one_tracker_leaves_the_other_capturing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y, val = _data()
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)  # never stepped
    opt_b = torch.optim.SGD(model.parameters(), lr=0.1)
    a = ShapleyTracker(model, opt_a, val_data=val, val_loss_fn=_mse_rows)
    b = ShapleyTracker(model, opt_b, val_data=val, val_loss_fn=_mse_rows)
    with b.batch(torch.arange(6)):
        with a._suspend():
            F.mse_loss(model(x), y).backward()
    opt_b.step()
    assert b.counts.tolist() == [1] * 6 and np.abs(b.values).sum() > 0


@pytest.mark.parametrize("name, member", [("shapley", Estimator.SHAPLEY), ("loo", Estimator.LOO),
                                          ("sgd", Estimator.SGD), (Estimator.LOO, Estimator.LOO)])
def test_estimator_names(name, member):
    assert Estimator.parse(name) is member and member == member.value and str(member) == member.value


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ConfigurationError, match=r"estimator must be one of \('midpoint', 'shapley', 'loo', 'sgd'\)"):
        Estimator.parse("midpointz")
