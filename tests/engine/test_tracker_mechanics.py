"""Tracker mechanics: micro-batches, skipped steps, shared weights, layer coverage, hook hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ShapleyTracker
from tests import oracles


def _mse_rows(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).flatten(1).mean(1)


def sgd_reference(model, loss_of_row, rows, val_loss, lr, n):
    """First-order value under plain SGD: ``lr * <g_v, c_i>`` with ``c_i = grad l_i / n``."""
    contrib = oracles.per_sample_grads(model, loss_of_row, rows)
    g_val = oracles.loss_grad(model, val_loss)
    return torch.stack([lr * sum((g_val[k] * contrib[k][i]).sum() / n for k in contrib) for i in range(n)])


def test_gradient_accumulation_equals_one_big_batch():
    def run(micro):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
        val = (torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g))
        tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows)
        for _ in range(3):
            for part in torch.arange(8).chunk(micro):
                with tr.batch(part):
                    (F.mse_loss(model(x[part]), y[part]) / micro).backward()
            opt.step()
            opt.zero_grad()
        return tr.values

    np.testing.assert_allclose(run(2), run(1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(run(4), run(1), rtol=1e-5, atol=1e-9)


def test_micro_batches_of_a_skipped_step_get_no_value():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = (torch.randn(4, 3), torch.randn(4, 1))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    with tr.batch([0, 1]):  # this step is "skipped" (e.g. GradScaler found inf): no opt.step()
        F.mse_loss(model(x[:2]), y[:2]).backward()
    opt.zero_grad()
    with tr.batch([2, 3]):
        F.mse_loss(model(x[2:]), y[2:]).backward()
    opt.step()
    assert tr.counts.tolist() == [0, 0, 1, 1]
    assert tr.skipped_steps == 1


def test_tied_weights_count_each_use():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(torch.tanh(self.mix(self.emb(t))))

    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 7, (5, 6))
    val_t = torch.randint(0, 7, (3, 6))

    def lm_rows(m, t):
        logits = m(t[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), t[:, 1:], reduction="none").mean(1)

    tr = ShapleyTracker(model, opt, val_data=val_t, val_loss_fn=lm_rows, estimator="shapley")
    ref = sgd_reference(
        model, lambda f, t: lm_rows(f, t).mean(), (tokens,), lambda f: lm_rows(f, val_t).mean(), 0.1, 5
    )
    with tr.batch(torch.arange(5)):
        lm_rows(model, tokens).mean().backward()
    opt.step()
    assert oracles.relative_error(tr.values, ref) < 1e-4


def test_multihead_attention_and_sequence_flattening_are_exact():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h, _ = self.attn(x, x, x, need_weights=False)
            b, t, d = h.shape
            return self.head(h.reshape(b * t, d)).view(b, t, 3)  # flattened rows: sample-major

    torch.manual_seed(0)
    model = Block()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 5, 8), torch.randn(4, 5, 3)
    val = (torch.randn(3, 5, 8), torch.randn(3, 5, 3))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, estimator="sgd")
    ref = sgd_reference(
        model, lambda f, xi, yi: ((f(xi) - yi) ** 2).mean(), (x, y),
        lambda f: ((f(val[0]) - val[1]) ** 2).mean(), 1e-2, 4,
    )
    with tr.batch(torch.arange(4)):
        ((model(x) - y) ** 2).mean().backward()
    opt.step()
    assert oracles.relative_error(tr.values, ref) < 1e-4
    kinds = {r.name: r.rule for r in tr.report()}
    assert kinds["attn"] == "attention-jvp" and "attn.out_proj" not in kinds


def test_dropout_inside_a_custom_module_is_replayed():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return F.dropout(x * self.w, p=0.5, training=self.training)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Noisy(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    val = (torch.randn(3, 4), torch.randn(3, 1))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, group_values=True, estimator="shapley")
    with tr.batch(torch.arange(5)):
        F.mse_loss(model(x), y).backward()
    # reference for the custom module: its per-sample gradient from the actual backward pass
    w_grad_sum = model[1].w.grad.clone()
    model.eval()
    g_val = oracles.loss_grad(model, lambda f: ((f(val[0]) - val[1]) ** 2).mean())
    model.train()
    opt.step()
    j = tr.group_names.index("1")
    # the per-sample values of the module sum to lr * <g_v, total gradient of w>
    assert np.isclose(tr.group_values[:, j].sum(), 0.1 * float((g_val["1.w"] * w_grad_sum).sum()), rtol=1e-5)


def test_detach_removes_every_hook():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters())
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    opt_hooks = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    with ShapleyTracker(model, opt, val_data=torch.randn(2, 3), val_loss_fn=lambda m, b: m(b).sum(1)):
        pass
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == before
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == opt_hooks


def test_batchnorm_excluded_on_request_and_reported():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model[1].eval()  # in training mode it is refused even when excluded (it couples the samples)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = (torch.randn(4, 3), torch.randn(4, 1))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, exclude=["1"])
    status = {r.name: r.status for r in tr.report()}
    assert status == {"0": "tracked", "1": "excluded", "2": "tracked"}
    assert tr.untracked_optimized == ["1.weight", "1.bias"]
    model[1].train()
    with pytest.warns(UserWarning, match="BatchNorm"):
        ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, strict=False).detach()
    tr.detach()


def test_frozen_batchnorm_in_eval_mode_is_tracked_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model(torch.randn(16, 3))  # some running statistics
    model[1].eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    val = (torch.randn(4, 3), torch.randn(4, 1))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, estimator="shapley")
    model.eval()
    ref = sgd_reference(model, lambda f, xi, yi: ((f(xi) - yi) ** 2).mean(), (x, y),
                        lambda f: ((f(val[0]) - val[1]) ** 2).mean(), 0.1, 5)
    model.train()
    model[1].eval()
    with tr.batch(torch.arange(5)):
        F.mse_loss(model(x), y).backward()
    opt.step()
    assert oracles.relative_error(tr.values, ref) < 1e-4


def test_sampled_validation_batch_uses_the_same_rows_per_step():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = (torch.randn(40, 3), torch.randn(40, 1))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, val_sample_size=5, seed=3)
    a, b = tr.validation.indices(7), tr.validation.indices(7)
    assert torch.equal(a, b) and len(a) == 5 and not torch.equal(a, tr.validation.indices(8))
    tr.detach()


def _loss_scaled_run(estimator: str, make_opt, *, use_scaler: bool, clip: float | None, device: str = "cpu"):
    """Three steps of 4 rows; the second one's loss is infinite (a GradScaler must skip it; the run
    without a scaler leaves it out). ``clip``: unscale (with a scaler) and clip the gradient norm
    before the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g).to(device), torch.randn(12, 2, generator=g).to(device)
    val = (torch.randn(4, 4, generator=g).to(device), torch.randn(4, 2, generator=g).to(device))
    tr = ShapleyTracker(model, opt, val_data=val, val_loss_fn=_mse_rows, estimator=estimator, step_check="raise")
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10) if use_scaler else None
    for step, ids in enumerate(torch.arange(12).split(4)):
        poison = step == 1
        if poison and not use_scaler:
            continue
        with tr.batch(ids):
            rows = ids.to(device)
            loss = F.mse_loss(model(x[rows]), y[rows]) * (float("inf") if poison else 1.0)
            (scaler.scale(loss) if scaler else loss).backward()
        if clip is not None:
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return tr


def _assert_scaling_cancels(make_opt, **kwargs):
    scaled, plain = (_loss_scaled_run(make_opt=make_opt, use_scaler=s, **kwargs) for s in (True, False))
    assert scaled.counts[4:8].tolist() == [0, 0, 0, 0] and scaled.skipped_steps == 1
    assert np.abs(plain.values).sum() > 0
    np.testing.assert_allclose(scaled.values, plain.values, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("estimator", ["midpoint", "shapley"])
def test_grad_scaler_skipped_step_gets_no_value_and_scaling_cancels(estimator):
    _assert_scaling_cancels(lambda p: torch.optim.AdamW(p, lr=1e-2), estimator=estimator, clip=0.5)


FUSED = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
}


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["in_kernel", "unscale_then_clip"])
@pytest.mark.parametrize("optimizer", list(FUSED))
@pytest.mark.parametrize("estimator", ["midpoint", "shapley"])
def test_fused_optimizer_under_grad_scaler(estimator, optimizer, clip, device):
    """``scaler.step`` hands a fused optimizer ``grad_scale`` and ``found_inf`` as attributes for
    the length of its step; the kernel divides ``.grad`` in place and skips where ``found_inf``.
    Values equal the unscaled run's (to rounding), and the skipped step gets none. With
    ``unscale_`` first (to clip), ``grad_scale`` is None and only ``found_inf`` is handed over."""
    _assert_scaling_cancels(FUSED[optimizer], estimator=estimator, clip=clip, device=device)
