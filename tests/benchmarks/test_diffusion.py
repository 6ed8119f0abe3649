"""The diffusion benchmark's pieces: the fixed-noise utility, the weights' fit, the callback run."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks import diffusion as bench
from benchmarks.common import diffusion as dm
from inrun_shapley import ShapleyTracker
from inrun_shapley.posthoc.weighting import FitConfig, compute_group_components, fit_weights


def tiny_data(n=12, K=3, seed=0):
    x = torch.rand(n, dm.PIXELS, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x, dm.fixed_noise(x, K, seed=seed + 1)


def direct_loss(net, x0, t, eps):
    """The utility written out for ONE image: no packing, ᾱ from the betas, a Python loop over k."""
    betas = [1e-4 * 1000 / dm.T_STEPS + i * (0.02 - 1e-4) * 1000 / dm.T_STEPS / (dm.T_STEPS - 1)
             for i in range(dm.T_STEPS)]
    total = 0.0
    for k in range(len(t)):
        ab = math.prod(1 - b for b in betas[: int(t[k]) + 1])
        x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps[k]
        total = total + ((net.denoise(x_t[None], t[k : k + 1].float())[0] - eps[k]) ** 2).mean()
    return total / len(t)


def test_fixed_noise_loss_and_gradient_equal_autograd_on_a_direct_implementation():
    net = dm.DiffusionNet(hidden=16, seed=3)
    x, packed = tiny_data()
    t, eps = packed[..., -1].long(), packed[..., dm.PIXELS:2 * dm.PIXELS]
    params = list(net.parameters())
    for i in (0, 5):
        batched = dm.per_sample_loss(net, packed)[i]
        direct = direct_loss(net, x[i], t[i], eps[i])
        assert torch.allclose(batched, direct, rtol=1e-5)
        g_batched = torch.autograd.grad(batched, params)
        g_direct = torch.autograd.grad(direct, params)
        for a, b in zip(g_batched, g_direct):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # the same gradients through compute_group_components (vmap over packed rows): the total
    # component of (train i, query q) is the dot product of the two direct gradients
    comps = compute_group_components(net, dm.denoising_loss_fn, (packed[:4], packed[:4]),
                                     (packed[4:6], packed[4:6]), "tensor", batch_size=3)
    flat = lambda loss: torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()  # noqa: E731
    expect = np.array([[float(flat(direct_loss(net, x[i], t[i], eps[i])) @ flat(direct_loss(net, x[q], t[q], eps[q])))
                        for q in (4, 5)] for i in range(4)])
    np.testing.assert_allclose(comps.total(), expect, rtol=1e-4)


def test_pack_and_query_timesteps():
    x, _ = tiny_data(n=2)
    ts = bench.query_timesteps(5)
    packed = dm.fixed_noise(x, 5, seed=0, timesteps=ts)
    assert packed.shape == (2, 5, dm.PACKED)
    assert torch.equal(packed[0, :, -1].long(), ts) and torch.equal(packed[1, :, -1].long(), ts)
    assert torch.equal(packed[1, 2, : dm.PIXELS], x[1])
    assert ts[0] == 0 and ts[-1] == dm.T_STEPS - 1


def test_aspect_losses_have_the_documented_sign():
    net = dm.DiffusionNet(hidden=8, seed=0)
    out = net(dm.fixed_noise(torch.zeros(1, dm.PIXELS), 2, seed=0))
    thicker = out.clone()
    thicker[..., dm.PIXELS:] += 0.1
    up = torch.ones(1)
    assert dm.ink_aspect_loss(thicker, up) < dm.ink_aspect_loss(out, up)  # more ink = lower loss
    assert dm.ink_aspect_loss(thicker, -up) > dm.ink_aspect_loss(out, -up)
    clf = torch.nn.Linear(dm.PIXELS, 10)
    with torch.no_grad():
        clf.weight.zero_()
        clf.bias.copy_(torch.arange(10.0))
    loss = dm.class_aspect_loss(clf)
    assert loss(out, torch.tensor([9])) < loss(out, torch.tensor([0]))  # class 9 has the top logit


def test_weight_fit_is_deterministic_for_a_seed():
    net = dm.DiffusionNet(hidden=8, seed=1)
    _, packed = tiny_data(n=10, K=2)
    comps = compute_group_components(net, dm.denoising_loss_fn, (packed[:7], packed[:7]),
                                     (packed[7:], packed[7:]), "tensor")
    config = FitConfig(seed=4, steps=30, restarts=3, top_k=2)
    a, b = fit_weights(comps, config), fit_weights(comps, config)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.objective_trace, b.objective_trace)
    assert a.fit_info["restart_objectives"] == b.fit_info["restart_objectives"]
    assert min(a.objective_trace) <= a.fit_info["uniform_objective"]


def test_callback_on_the_diffusion_model_equals_the_plain_tracker(tmp_path):
    cfg = replace(bench.Config.quick(), n_train=20, K=2, K_query=3, epochs=2, batch_size=8,
                  n_checkpoints=2, trajectory_every=1)
    x, _ = tiny_data(n=cfg.n_train)
    train = dm.fixed_noise(x, cfg.K, seed=5)
    queries = dm.fixed_noise(x[:3].flip(-1), cfg.K_query, seed=6, timesteps=bench.query_timesteps(cfg.K_query))
    module, values, ckpts, preconds, _, _ = bench.lightning_run(train, queries, cfg, seed=0, workdir=tmp_path)

    net = dm.DiffusionNet(seed=0)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tracker = ShapleyTracker(net, opt, val_data=(queries,), val_loss_fn=lambda m, b: dm.per_sample_loss(m, b[0]),
                             per_query=True)
    for ids in dm.batch_order(cfg.n_train, 0, cfg.epochs, cfg.batch_size):
        with tracker.batch(torch.tensor(ids)):
            dm.per_sample_loss(net, train[ids]).mean().backward()
        opt.step()
        opt.zero_grad()
    tracker.detach()
    assert values.shape == (cfg.n_train, 3)
    ref = np.asarray(tracker.values, dtype=np.float64)
    assert np.abs(values - ref).max() <= 1e-5 * np.abs(ref).max()
    # the same weights as the plain loop and as train_denoiser (the LDS recipe)
    plain = dm.train_denoiser(train, seed=0, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    for a, b, c in zip(module.net.parameters(), net.parameters(), plain.parameters()):
        assert torch.equal(a.detach(), b.detach()) and torch.equal(b.detach(), c.detach())
    assert len(ckpts) == len(preconds) == cfg.n_checkpoints


@pytest.mark.parametrize("n,bs,epochs", [(10, 4, 2), (8, 4, 3)])
def test_batch_order_covers_every_sample_once_per_epoch(n, bs, epochs):
    order = dm.batch_order(n, seed=2, epochs=epochs, batch_size=bs)
    per_epoch = math.ceil(n / bs)
    assert len(order) == per_epoch * epochs
    for e in range(epochs):
        assert sorted(sum(order[e * per_epoch:(e + 1) * per_epoch], [])) == list(range(n))
    assert order == dm.batch_order(n, seed=2, epochs=epochs, batch_size=bs)
