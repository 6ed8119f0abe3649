"""Per-query values [n_train, Q] equal brute force: each query's own loss as the utility."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inrun_shapley import ConfigurationError, ShapleyTracker
from tests import oracles
from tests.engine.test_tracker_exact import OPTIMIZERS, MixedNet, make_data, val_loss_fn


@pytest.mark.parametrize("opt_name, order", [("sgd_momentum", 1), ("adam", 1), ("adamw", 1),
                                             ("sgd_momentum", 2), ("adamw", 2)])
def test_per_query_values_equal_brute_force(opt_name, order):
    torch.manual_seed(0)
    model = MixedNet()
    make_opt, kind = OPTIMIZERS[opt_name]
    opt = make_opt(model.parameters())
    queries = make_data(4, 100)
    tr = ShapleyTracker(model, opt, val_data=queries, val_loss_fn=val_loss_fn, per_query=True, order=order,
                        estimator="shapley")
    for step in range(3):
        img, tokens, y = make_data(6, step)
        with tr.batch(torch.arange(6) + 10 * step):
            F.cross_entropy(model(img, tokens), y).backward()
        theta = oracles.trainable(model)
        snap = oracles.snapshot_state(opt, model)
        contrib = oracles.per_sample_grads(model, lambda f, im, tk, yy: F.cross_entropy(f(im, tk), yy), (img, tokens, y))
        contrib = {k: v / 6 for k, v in contrib.items()}
        g_full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        fixed = oracles.make_step(kind, snap, theta, g_full, frozen=True)
        query_loss = [
            lambda f, q=q: F.cross_entropy(f(queries[0][q:q + 1], queries[1][q:q + 1]), queries[2][q:q + 1])
            for q in range(4)
        ]
        ref = torch.stack([
            oracles.reference_values(fixed, theta, contrib, oracles.loss_grad(model, query_loss[q]), order=order,
                                     hvp_fn=lambda u, q=q: oracles.hvp(model, query_loss[q], theta, u))
            for q in range(4)
        ], dim=1)
        opt.step()
        opt.zero_grad()
        got = torch.as_tensor(tr.store.last_record[2])
        assert got.shape == (6, 4)
        assert oracles.relative_error(got, ref) <= 1e-4
    assert tr.values.shape[1] == 4


def test_per_token_queries_sum_to_the_row_query():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Linear(4, 6))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seqs = torch.randint(0, 6, (3, 5))
    token_losses = lambda m, s: F.cross_entropy(m(s[:, :-1]).transpose(1, 2), s[:, 1:], reduction="none")  # noqa: E731
    per_token = ShapleyTracker(model, opt, val_data=seqs, val_loss_fn=token_losses, per_query=True)
    per_row = ShapleyTracker(model, opt, val_data=seqs, val_loss_fn=lambda m, s: token_losses(m, s).sum(1),
                             per_query=True)
    assert per_token.validation.query_count(model, torch.device("cpu")) == 12
    train = torch.randint(0, 6, (4, 5))
    per_token.begin_batch(torch.arange(4))
    per_row.begin_batch(torch.arange(4))
    token_losses(model, train).mean().backward()
    for tr in (per_token, per_row):
        tr.after_backward()
        tr.end_batch()
    opt.step()
    tokens = per_token.store.last_record[2]
    rows = per_row.store.last_record[2]
    assert tokens.shape == (4, 12) and rows.shape == (4, 3)
    assert oracles.relative_error(tokens.reshape(4, 3, 4).sum(-1), rows) <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"order": 2, "query_path": "ghost", "estimator": "shapley"}, "second-order per-query values take the exact path"),
    ({"val_sample_size": 2}, "use every query at every step"),
    ({"group_values": True}, "group_values are kept for the mean validation loss"),
])
def test_per_query_bad_combinations(kwargs, message):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ConfigurationError, match=message):
        ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), val_data=(torch.randn(4, 3), torch.randn(4, 1)),
                       val_loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1), per_query=True, **kwargs)
