"""``kernels="compiled"``: the midpoint's pass as one compiled kernel gives the list-wide kernels'
values (which the brute-force tests check), and falls back to them, with one warning, where
compiling fails."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker
from inrun_shapley.errors import ConfigurationError
from inrun_shapley.optim import fused


def _compiles() -> bool:
    try:
        torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)(torch.ones(3))
        return True
    except Exception:  # no C++ compiler, an unsupported build
        return False


def _run(kernels: str, make_opt, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = make_opt(model.parameters())
    val = (torch.randn(8, 12), torch.randint(0, 3, (8,)))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=loss_fn, kernels=kernels, step_check="raise")
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(10, 12, generator=g), torch.randint(0, 3, (10,), generator=g)
        opt.zero_grad()
        with tracker.batch(torch.arange(10) + 10 * step):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        out.append(torch.as_tensor(tracker.store.last_record[2]).clone())
    tracker.detach()
    return out


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "adam_l2_maximize": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1, maximize=True),
}


@pytest.mark.skipif(not _compiles(), reason="torch.compile does not work on this machine")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_kernels_give_the_list_wide_values(name):
    """First step (no moments yet) and later ones; AdamW's decay, Adam's L2 term and maximize."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning: the compiled kernel ran
        got = _run("compiled", OPTIMIZERS[name])
    assert fused.fused_available() is None
    for g, w in zip(got, _run("foreach", OPTIMIZERS[name])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)


def test_a_failing_compile_falls_back_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_kernel", lambda: broken)
    monkeypatch.setattr(fused, "_FAILED", None)
    with pytest.warns(UserWarning, match="could not compile the midpoint kernel here .*no compiler here"):
        got = _run("compiled", OPTIMIZERS["adamw"])
    assert "no compiler here" in fused.fused_available()
    for g, w in zip(got, _run("foreach", OPTIMIZERS["adamw"])):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12)


def test_unknown_kernels_are_refused():
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigurationError, match="kernels must be one of"):
        ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), val_data=(torch.randn(2, 2), torch.randn(2, 1)),
                       kernels="triton")


def test_shapes_past_the_recompile_limit_take_the_list_wide_kernels(monkeypatch):
    """Beyond torch.compile's recompile limit the body would run uncompiled: refused before."""
    monkeypatch.setattr(fused, "_recompile_limit", lambda: 0)
    monkeypatch.setattr(fused, "_SIGNATURES", set())
    monkeypatch.setattr(fused, "_kernel", lambda: pytest.fail("compiled past the limit"))
    g = [torch.randn(3)]
    assert not fused.adam_midpoint_fused(g, g, g, g, [torch.empty(3)], [torch.empty(3)], [1.0] * 9)


@pytest.mark.skipif(not _compiles(), reason="torch.compile does not work on this machine")
def test_a_changing_learning_rate_and_step_count_compile_once():
    """The per-step scalars are kernel arguments: a schedule changing the learning rate every step
    (and the step count, which moves the bias corrections) compiles the kernel once."""
    from torch._dynamo.utils import counters

    def make(ps):
        opt = torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1)
        make.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
        return opt

    torch._dynamo.reset()
    fused._COMPILED = None
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = make(model.parameters())
    val = (torch.randn(8, 12), torch.randint(0, 3, (8,)))
    tracker = ShapleyTracker(model, opt, val_data=val, kernels="compiled",
                             val_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    for step in range(4):
        x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
        opt.zero_grad()
        with tracker.batch(torch.arange(10) + 10 * step):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        make.scheduler.step()
    tracker.detach()
    assert fused.fused_available() is None
    # one graph: the first step (zero moments, same shapes) and the later ones share it
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
