"""The midpoint estimator (the default) equals a brute-force implementation of its rule.

Brute force: per-sample gradients by ``torch.func``, the real optimizer step re-implemented from
torch's documented update on a snapshot of the state before the step, ``θ_half = θ_t + Δ(G/2)``,
and ``φ_i = -<∇L_val(θ_half), J_Δ(G/2)·c_i>`` with the Jacobian-vector product by forward-mode
autograd through the update (``oracles.reference_midpoint``). Nothing of the library's optimizer
adapters or capture rules is used by the reference.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker
from inrun_shapley.engine.step_check import StepSumError
from tests import oracles
from tests.engine.test_tracker_exact import OPTIMIZERS, MixedNet, make_data, val_loss_fn

VAL_F = lambda val: (lambda f: F.cross_entropy(f(val[0], val[1]), val[2]))  # noqa: E731


def _f64(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _f64(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_f64(v) for v in x)
    return x


def _reference(model, opt, kind, contrib, g_full, loss_f):
    """Brute-force midpoint values, computed in float64 whatever the model's dtype: in fp32,
    autograd through Adam's first steps cancels (``1/D - |g|/D²``) and the reference itself would
    carry percent-level rounding error."""
    model64 = copy.deepcopy(model).double()
    theta = _f64(oracles.trainable(model))
    snap = _f64(oracles.snapshot_state(opt, model))
    real = oracles.make_step(kind, snap, theta, None, frozen=False)
    loss64 = lambda f: loss_f(lambda *a: f(*_f64(a)))  # noqa: E731
    return oracles.reference_midpoint(real, _f64(g_full), _f64(contrib),
                                      lambda th: oracles.loss_grad(model64, loss64, params=th))


def run_midpoint(opt_name, steps=3, clip=None, micro=1, dtype=torch.float32, seed=0):
    """Per-step relative errors of the tracker's midpoint values against brute force."""
    torch.manual_seed(seed)
    model = MixedNet().to(dtype)
    make_opt, kind = OPTIMIZERS[opt_name]
    opt = make_opt(model.parameters())
    val = make_data(5, 100, dtype)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=val_loss_fn, step_check="raise")
    assert tracker.estimator == "midpoint"
    errors = []
    for step in range(steps):
        img, tokens, y = make_data(6 * micro, seed + step, dtype)
        parts = torch.arange(6 * micro).chunk(micro)
        for ids in parts:  # gradient accumulation: several blocks, one step
            with tracker.batch(ids + 100 * step):
                (F.cross_entropy(model(img[ids], tokens[ids]), y[ids]) / micro).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        contrib = oracles.per_sample_grads(model, lambda f, im, tk, yy: F.cross_entropy(f(im, tk), yy),
                                           (img, tokens, y))
        contrib = {k: v / (6 * micro) for k, v in contrib.items()}
        g_full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        kappa = torch.sqrt(sum((g_full[k] ** 2).sum() for k in g_full)
                           / sum((contrib[k].sum(0) ** 2).sum() for k in contrib))
        contrib = {k: v * kappa for k, v in contrib.items()}
        ref = _reference(model, opt, kind, contrib, g_full, VAL_F(val))
        opt.step()
        opt.zero_grad()
        got = torch.as_tensor(tracker.store.last_record[2])
        errors.append(oracles.relative_error(got, ref))
    tracker.detach()
    return errors


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_midpoint_equals_brute_force(opt_name):
    errors = run_midpoint(opt_name)
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum", "adam_amsgrad_foreach"])
def test_midpoint_with_clipping_and_accumulation(opt_name):
    errors = run_midpoint(opt_name, clip=0.05, micro=2)
    assert max(errors) <= 1e-4, errors


def test_midpoint_fp64_is_exact_to_rounding():
    errors = run_midpoint("adamw", dtype=torch.float64)
    assert max(errors) <= 1e-10, errors


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_per_query_midpoint_equals_brute_force(opt_name):
    torch.manual_seed(0)
    model = MixedNet()
    make_opt, kind = OPTIMIZERS[opt_name]
    opt = make_opt(model.parameters())
    queries = make_data(4, 100)
    tr = ShapleyTracker(model, opt, val_data=queries, val_loss_fn=val_loss_fn, per_query=True, query_path="exact")
    query_loss = [lambda f, q=q: F.cross_entropy(f(queries[0][q:q + 1], queries[1][q:q + 1]), queries[2][q:q + 1])
                  for q in range(4)]
    for step in range(3):
        img, tokens, y = make_data(6, step)
        with tr.batch(torch.arange(6) + 10 * step):
            F.cross_entropy(model(img, tokens), y).backward()
        contrib = oracles.per_sample_grads(model, lambda f, im, tk, yy: F.cross_entropy(f(im, tk), yy),
                                           (img, tokens, y))
        contrib = {k: v / 6 for k, v in contrib.items()}
        g_full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        ref = torch.stack([_reference(model, opt, kind, contrib, g_full, query_loss[q]) for q in range(4)], dim=1)
        opt.step()
        opt.zero_grad()
        got = torch.as_tensor(tr.store.last_record[2])
        assert got.shape == (6, 4)
        assert oracles.relative_error(got, ref) <= 1e-4


def _lm_run(query_path, opt_factory, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 9))
    opt = opt_factory(model.parameters())
    seqs = torch.randint(0, 9, (3, 5))
    rows = lambda m, s: F.cross_entropy(m(s[:, :-1]).transpose(1, 2), s[:, 1:], reduction="none").mean(1)  # noqa: E731
    tr = ShapleyTracker(model, opt, val_data=seqs, val_loss_fn=rows, per_query=True, query_path=query_path)
    out = []
    for step in range(steps):
        batch = torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(step))
        with tr.batch(torch.arange(4) + 4 * step):
            rows(model, batch).mean().backward()
        opt.step()
        opt.zero_grad()
        out.append(tr.store.last_record[2])
    return np.concatenate(out), tr


def test_ghost_path_midpoint_is_exact_under_sgd():
    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    exact, _ = _lm_run("exact", sgd)
    ghost, tr = _lm_run("ghost", sgd)
    assert any(row.path == "ghost" for row in tr.query_plan)
    np.testing.assert_allclose(ghost, exact, rtol=1e-4, atol=1e-9)


def test_ghost_path_midpoint_under_adam_tracks_the_exact_path():
    from inrun_shapley.metrics import spearman

    adam = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    exact, _ = _lm_run("exact", adam, steps=6)
    ghost, _ = _lm_run("ghost", adam, steps=6)
    # the Linear weights' Jacobian is replaced by a rank-1 factorization: an approximation
    rho = np.mean([spearman(ghost[-4:, q], exact[-4:, q]) for q in range(exact.shape[1])])
    assert rho >= 0.8, rho


def test_midpoint_never_writes_the_parameters_and_leaves_the_run_unchanged():
    def train(track):
        torch.manual_seed(0)
        model = MixedNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tr = ShapleyTracker(model, opt, val_data=make_data(5, 100), val_loss_fn=val_loss_fn) if track else None
        versions = []
        for step in range(3):
            img, tokens, y = make_data(6, step)
            ids = torch.arange(6) + 10 * step
            if tr is not None:
                with tr.batch(ids):
                    F.cross_entropy(model(img, tokens), y).backward()
            else:
                F.cross_entropy(model(img, tokens), y).backward()
            before = [p._version for p in model.parameters()]
            opt.step()
            versions.append([p._version - v for p, v in zip(model.parameters(), before)])
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], versions

    tracked, v1 = train(True)
    plain, v2 = train(False)
    assert v1 == v2  # the tracker's hooks add no in-place write to any parameter
    for a, b in zip(tracked, plain):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- the step-sum check
def _small(step_check="warn"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    tr = ShapleyTracker(model, opt, val_data=(x[:3], y[:3]), val_loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1),
                        step_check=step_check)
    return model, opt, x, y, tr


def test_step_sum_check_passes_on_a_normal_run():
    model, opt, x, y, tr = _small("raise")
    for _ in range(3):
        with tr.batch(torch.arange(8)):
            F.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # after the block: accounted for
        opt.step()
        opt.zero_grad()
    assert tr.step_check.last_error < 1e-5


def _clip_inside(model, opt, x, y, tr, steps=3):
    for _ in range(steps):
        with tr.batch(torch.arange(8)):
            F.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # wrong place
        opt.step()
        opt.zero_grad()


def test_step_sum_check_catches_clipping_inside_the_block():
    # Adam's first step is invariant to the gradient's scale (sum of values ~ 0 either way), so
    # the mismatch shows from the second step on.
    with pytest.warns(RuntimeWarning, match="inside `with tracker.batch"):
        _clip_inside(*_small("warn"))
    with pytest.raises(StepSumError):
        _clip_inside(*_small("raise"))


def test_step_sum_check_catches_a_loss_term_the_capture_missed():
    """A penalty on the first layer's weight enters the gradient but no sample's contribution."""
    model, opt, x, y, tr = _small("raise")
    with pytest.raises(StepSumError, match="0"):
        with tr.batch(torch.arange(8)):
            (F.mse_loss(model(x), y) + model[0].weight.square().sum()).backward()
        opt.step()


def test_step_sum_check_warns_once_and_can_be_switched_off():
    model, opt, x, y, tr = _small("off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tr.batch(torch.arange(8)):
            F.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()


def _values_with_closure(opt_name, how, steps=3):
    """Each step's values when the forward and backward run inside ``opt.step(closure)`` (how =
    "positional" or "keyword", as Lightning's automatic optimization does) or before it (None)."""
    torch.manual_seed(0)
    model = MixedNet()
    make_opt, _ = OPTIMIZERS[opt_name]
    opt = make_opt(model.parameters())
    val = make_data(5, 100, torch.float32)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=val_loss_fn, step_check="raise")
    out = []
    for step in range(steps):
        img, tokens, y = make_data(6, step, torch.float32)
        ids = torch.arange(6) + 100 * step

        def closure():
            opt.zero_grad()
            with tracker.batch(ids):
                loss = F.cross_entropy(model(img, tokens), y)
                loss.backward()
            return loss

        if how is None:
            closure()
            opt.step()
        elif how == "positional":
            opt.step(closure)
        else:
            opt.step(closure=closure)
        out.append(torch.as_tensor(tracker.store.last_record[2]).clone())
    tracker.detach()
    return out


@pytest.mark.parametrize("how", ["positional", "keyword"])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_midpoint_under_a_step_closure_equals_the_plain_loop(opt_name, how):
    """With a closure the gradients exist only inside step(): the pre-hook wraps the closure and
    the midpoint's stages run right after it, before the update."""
    for got, want in zip(_values_with_closure(opt_name, how), _values_with_closure(opt_name, None)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
