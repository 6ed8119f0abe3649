"""The tracker's per-step values equal brute force (torch.func per-sample gradients + the
docs/math.md §2 formulas) for a model mixing every capture rule, under every supported optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker
from tests import oracles


class Gate(nn.Module):
    """A custom layer with no dedicated rule: handled by the generic JVP rule."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d) * 0.5)
        self.c = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * torch.tanh(self.w) + self.c


class MixedNet(nn.Module):
    """Conv2d + GroupNorm on an image, Embedding + Linear (3-D) + LayerNorm + RMSNorm + custom on
    a token sequence, Linear (2-D) head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.gn = nn.GroupNorm(1, 3)
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.seq = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.gate = Gate(4)
        self.head = nn.Linear(3 * 4 * 4 + 4, 3)

    def forward(self, img, tokens):
        h = self.gn(self.conv(img)).relu().flatten(1)
        e = self.ln(self.seq(self.emb(tokens)).tanh())
        e = self.gate(self.rms(e)).mean(1)
        return self.head(torch.cat([h, e], 1))


def make_data(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 1, 4, 4, generator=g).to(dtype)
    tokens = torch.randint(0, 10, (n, 5), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return img, tokens, y


def val_loss_fn(model, batch):
    img, tokens, y = batch
    return F.cross_entropy(model(img, tokens), y, reduction="none")


OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1), "sgd"),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2), "sgd"),
    "sgd_nesterov": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2), "sgd"),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2), "adam"),
    "adam_amsgrad_foreach": (lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, foreach=True), "adam"),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), "adam"),
    "adamw_maximize": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, maximize=True), "adam"),
    "adamw_fused": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True), "adam"),
    "adamw_two_groups": (lambda p: torch.optim.AdamW(_two_groups(p), lr=1e-2), "adam"),
    "sgd_two_groups": (lambda p: torch.optim.SGD(_two_groups(p), lr=0.05, momentum=0.9), "sgd"),
}


def _two_groups(params):
    """Convolutional branch and the rest, with different learning rates and weight decay."""
    params = list(params)
    return [{"params": params[:4], "lr": 3e-2, "weight_decay": 0.05}, {"params": params[4:], "lr": 5e-3}]


def run_and_compare(opt_name, order=1, estimator="shapley", steps=3, clip=None, seed=0, dtype=torch.float32,
                    scheduler=None):
    torch.manual_seed(seed)
    model = MixedNet().to(dtype)
    make_opt, kind = OPTIMIZERS[opt_name]
    opt = make_opt(model.parameters())
    val = make_data(5, 100, dtype)
    tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=val_loss_fn, order=order, estimator=estimator)
    sched = scheduler(opt) if scheduler is not None else None
    errors = []
    for step in range(steps):
        img, tokens, y = make_data(6, seed + step, dtype)
        with tracker.batch(torch.arange(6) + 10 * step):
            F.cross_entropy(model(img, tokens), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

        # brute force at theta_t, before the step
        theta = oracles.trainable(model)
        snap = oracles.snapshot_state(opt, model)
        contrib = oracles.per_sample_grads(
            model, lambda f, im, tk, yy: F.cross_entropy(f(im, tk), yy), (img, tokens, y)
        )
        contrib = {k: v / 6 for k, v in contrib.items()}
        g_full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        kappa = torch.sqrt(sum((g_full[k] ** 2).sum() for k in g_full) / sum((contrib[k].sum(0) ** 2).sum() for k in contrib))
        contrib = {k: v * kappa for k, v in contrib.items()}
        val_f = lambda f: F.cross_entropy(f(val[0], val[1]), val[2])  # noqa: E731
        g_val = oracles.loss_grad(model, val_f)
        if estimator == "loo":
            real = oracles.make_step(kind, snap, theta, g_full, frozen=False)
            ref = oracles.reference_loo(real, g_full, contrib, g_val)
        else:
            if estimator == "sgd":
                snap = {n: ({**h, "momentum": 0, "weight_decay": 0, "maximize": h.get("maximize", False),
                             "dampening": 0, "nesterov": False}, {}) for n, (h, s) in snap.items()}
                kind_used = "sgd"
            else:
                kind_used = kind
            fixed = oracles.make_step(kind_used, snap, theta, g_full, frozen=True)
            ref = oracles.reference_values(
                fixed, theta, contrib, g_val, order=order,
                hvp_fn=lambda u: oracles.hvp(model, val_f, theta, u),
            )
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()  # the next step's lr differs; the snapshot above read this step's
        got = torch.as_tensor(tracker.store.last_record[2])
        errors.append(oracles.relative_error(got, ref))
    tracker.detach()
    return errors


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_first_order_equals_brute_force(opt_name):
    errors = run_and_compare(opt_name, order=1)
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw", "adamw_maximize"])
def test_second_order_equals_brute_force(opt_name):
    errors = run_and_compare(opt_name, order=2)
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "adam_amsgrad_foreach"])
def test_loo_equals_linearized_real_step(opt_name):
    # float64: at Adam's first step J = kP - (...) cancels almost exactly (J ≈ eps/(|g|+eps)²),
    # which fp32 cannot resolve to 1e-4 relative (in the library or in the oracle).
    errors = run_and_compare(opt_name, estimator="loo", dtype=torch.float64)
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_sgd_form_baseline_is_lr_times_gradient_dot(opt_name):
    errors = run_and_compare(opt_name, estimator="sgd")
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("opt_name", ["adam", "sgd_nesterov"])
def test_float64_models_are_scored_in_float64(opt_name):
    errors = run_and_compare(opt_name, order=2, dtype=torch.float64)
    assert max(errors) <= 1e-10, errors


@pytest.mark.parametrize("opt_name", ["adamw_two_groups", "sgd_two_groups"])
def test_learning_rate_schedule_across_param_groups(opt_name):
    errors = run_and_compare(opt_name, order=2, steps=4,
                             scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_gradient_clipping_factor_is_applied(opt_name):
    errors = run_and_compare(opt_name, clip=0.05)
    assert max(errors) <= 1e-4, errors
