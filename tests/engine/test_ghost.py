"""Ghost-path per-query values (issue 5): exact under SGD against brute force and the exact path,
per-token queries, the rank-1 preconditioner approximation under Adam (measured and bounded),
exactness when Adam's P is rank-1, the cost-based choice, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun_shapley import ConfigurationError, ShapleyTracker
from inrun_shapley.capture.ghost import gram_product as _gram_product, rank_one_precond
from inrun_shapley.engine.queries import GhostQueries, estimated_flops
from inrun_shapley.optim import StepTerms, register_adapter, unregister_adapter
from inrun_shapley.optim.adam import AdamAdapter
from tests import oracles

V, D, H, T = 11, 6, 8, 5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only contend (seconds per backward on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyLM(nn.Module):
    """Embedding + Linear on [B, T, d] + LayerNorm (exact fallback) + Linear head, padding id 0."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.up = nn.Linear(D, H)
        self.ln = nn.LayerNorm(H)
        self.head = nn.Linear(H, V)

    def forward(self, x):
        return self.head(self.ln(torch.tanh(self.up(self.emb(x)))))


def token_losses(model, seqs):
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")  # [m, T-1]


def row_losses(model, seqs):
    return token_losses(model, seqs).mean(1)


def seqs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T + 1), generator=g)


def run_side_by_side(make_opt, loss_fn=row_losses, steps=3, estimator="shapley", n_queries=4, seed=0):
    """Train a TinyLM; an exact-path and a ghost-path tracker watch the same run.

    Returns ``[(exact [n, Q], ghost [n, Q], brute force [n, Q] or None)]`` per step.
    """
    torch.manual_seed(seed)
    model = TinyLM()
    opt = make_opt(model.parameters())
    queries = seqs(n_queries, 100)
    kw = dict(val_data=queries, val_loss_fn=loss_fn, per_query=True, estimator=estimator)
    exact = ShapleyTracker(model, opt, query_path="exact", **kw)
    ghost = ShapleyTracker(model, opt, query_path="ghost", **kw)
    out = []
    for step in range(steps):
        batch = seqs(6, step)
        ids = torch.arange(6) + 10 * step
        exact.begin_batch(ids)
        ghost.begin_batch(ids)
        row_losses(model, batch).mean().backward()
        for tr in (exact, ghost):
            tr.after_backward()
            tr.end_batch()
        brute = None
        if isinstance(opt, torch.optim.SGD) and loss_fn is row_losses:
            theta = oracles.trainable(model)
            snap = oracles.snapshot_state(opt, model)
            contrib = oracles.per_sample_grads(model, lambda f, s: row_losses(lambda x: f(x), s).mean(), (batch,))
            contrib = {k: v / 6 for k, v in contrib.items()}
            g_full = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            fixed = oracles.make_step("sgd", snap, theta, g_full, frozen=True)
            brute = torch.stack([
                oracles.reference_values(fixed, theta, contrib, oracles.loss_grad(
                    model, lambda f, q=q: row_losses(lambda x: f(x), queries[q:q + 1]).sum()))
                for q in range(n_queries)
            ], dim=1)
        opt.step()
        opt.zero_grad()
        out.append((torch.as_tensor(exact.store.last_record[2]), torch.as_tensor(ghost.store.last_record[2]), brute))
    assert [r.path for r in ghost.query_plan] == ["ghost", "ghost", "exact", "ghost"]
    exact.detach()
    ghost.detach()
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


SGD_CASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
}


@pytest.mark.parametrize("opt_name", list(SGD_CASES))
def test_ghost_equals_brute_force_and_exact_path_under_sgd(opt_name):
    for exact, ghost, brute in run_side_by_side(SGD_CASES[opt_name]):
        assert ghost.shape == (6, 4)
        assert oracles.relative_error(ghost, brute) <= 1e-4
        assert oracles.relative_error(ghost, exact) <= 1e-4


def test_ghost_per_token_queries_equal_exact_path():
    for exact, ghost, _ in run_side_by_side(SGD_CASES["sgd"], loss_fn=token_losses):
        assert ghost.shape == (6, 4 * T)
        assert oracles.relative_error(ghost, exact) <= 1e-4


def test_sgd_form_estimator_is_exact_under_adamw():
    for exact, ghost, _ in run_side_by_side(lambda p: torch.optim.AdamW(p, lr=1e-2), estimator="sgd"):
        assert oracles.relative_error(ghost, exact) <= 1e-4


# Measured on this fixed case (AdamW, 8 steps, batch 6, 8 queries, seed 0; ghost vs exact path):
#   step:                       1     2     3     4     5     6     7     8
#   mean per-query Spearman   0.793 0.886 0.950 0.943 0.950 0.986 0.929 0.986
#   mean per-query Pearson    0.859 0.933 0.969 0.985 0.994 0.996 0.993 0.993
#   relative error (max-norm) 0.622 0.554 0.157 0.198 0.213 0.112 0.116 0.216
# Adam's first steps (P ≈ 1/|g|, far from rank-1) are the worst; seeds 1-3 gave step-1 Spearman
# 0.55-0.61 and steps 3-8 ≥ 0.88. Bounds with margin, first two steps and afterwards:
ADAM_EARLY = {"spearman": 0.65, "pearson": 0.75, "rel": 0.9}
ADAM_LATER = {"spearman": 0.85, "pearson": 0.92, "rel": 0.35}


def test_ghost_error_under_adam_is_bounded():
    res = run_side_by_side(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), steps=8, n_queries=8)
    rho, pear, rel = [], [], []
    for exact, ghost, _ in res:
        e, g = exact.numpy(), ghost.numpy()
        rho.append(np.mean([spearman(e[:, q], g[:, q]) for q in range(e.shape[1])]))
        pear.append(np.mean([np.corrcoef(e[:, q], g[:, q])[0, 1] for q in range(e.shape[1])]))
        rel.append(oracles.relative_error(ghost, exact))
    print(f"ghost vs exact under AdamW per step: Spearman {np.round(rho, 3).tolist()} Pearson "
          f"{np.round(pear, 3).tolist()} relative error {np.round(rel, 3).tolist()}")
    for steps, bound in ((slice(0, 2), ADAM_EARLY), (slice(2, None), ADAM_LATER)):
        assert min(rho[steps]) >= bound["spearman"], rho
        assert min(pear[steps]) >= bound["pearson"], pear
        assert max(rel[steps]) <= bound["rel"], rel


class RankOneAdam(torch.optim.Adam):
    """Adam whose fixed-state preconditioner is replaced by a rank-1 one (test only)."""


class RankOneAdamAdapter(AdamAdapter):
    def terms(self, grad, group, state, before, theta, need_drift, need_loo) -> StepTerms:
        t = super().terms(grad, group, state, before, theta, need_drift, need_loo)
        if t.precond.dim() == 2:
            p = t.precond
            t.precond = torch.outer(p.mean(1), p.mean(0)) / p.mean()
        return t


def test_ghost_is_exact_when_adam_preconditioner_is_rank_one():
    register_adapter(RankOneAdam)(RankOneAdamAdapter)  # test-only: keep it out of the global table
    try:
        for exact, ghost, _ in run_side_by_side(lambda p: RankOneAdam(p, lr=1e-2), steps=3):
            assert oracles.relative_error(ghost, exact) <= 1e-4
    finally:
        unregister_adapter(RankOneAdam)


def test_rank_one_factorization_is_exact_on_rank_one_and_adafactor_like_otherwise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, generator=g) + 0.1, torch.rand(7, generator=g) + 0.1
    u, w = rank_one_precond(torch.outer(x, y))
    assert torch.allclose(torch.outer(u, w), torch.outer(x, y), rtol=1e-5)
    v = torch.rand(5, 7, generator=g)
    u, w = rank_one_precond(1.0 / (v.sqrt() + 1e-8))
    approx = torch.outer(v.mean(1), v.mean(0)) / v.mean()
    assert torch.allclose(torch.outer(u, w), 1.0 / approx.sqrt(), rtol=1e-4)


def test_query_activations_are_not_summed_over_samples():
    # The docs/math.md §5.1 pitfall: with 2 query samples, summing their activations before the
    # outer product gives a different (wrong) number than the sum of their own gradients.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 2, generator=g)
    aq, bq = torch.randn(2, 4, 5, generator=g), torch.randn(2, 1, 4, 2, generator=g)
    got = _gram_product(a, b, aq, bq)  # [3, 2]
    per_sample = torch.einsum("ntd,nte->ned", a, b)
    query = torch.einsum("qsd,qse->qed", aq, bq[:, 0])
    assert torch.allclose(got, torch.einsum("ned,qed->nq", per_sample, query), atol=1e-5)
    wrong = torch.einsum("ned,ed->n", per_sample, torch.einsum("sd,se->ed", aq.sum(0), bq[:, 0].sum(0)))
    assert not torch.allclose(got.sum(1), wrong, atol=1e-3)


def test_auto_prefers_ghost_for_large_vocabulary_and_exact_for_long_sequences():
    ex, gh = estimated_flops("embedding", train_positions=32 * 16, queries=64, query_rows=64, query_positions=16,
                             d_in=50_000, d_out=64)
    assert gh < ex
    ex, gh = estimated_flops("linear", train_positions=32 * 512, queries=64, query_rows=64, query_positions=512,
                             d_in=64, d_out=64)
    assert ex < gh
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = ShapleyTracker(model, opt, val_data=seqs(3, 1), val_loss_fn=row_losses, per_query=True)
    with tr.batch(torch.arange(4)):
        row_losses(model, seqs(4, 2)).mean().backward()
    opt.step()
    plan = {r.module: r for r in tr.query_plan}
    assert plan["ln"].path == "exact" and plan["ln"].reason == "no ghost form"
    for name in ("emb", "up", "head"):
        assert plan[name].exact_flops is not None and plan[name].path in ("ghost", "exact")
        assert plan[name].path == ("ghost" if plan[name].ghost_flops < plan[name].exact_flops else "exact")
    assert tr.values.shape[1] == 3
    assert isinstance(GhostQueries({}).n_queries, int)


@pytest.mark.parametrize("kwargs, message", [
    ({"per_query": True, "query_path": "fast"}, "query_path must be one of"),
    ({"query_path": "ghost"}, "query_path applies to per-query values"),
    ({"per_query": True, "query_path": "ghost", "estimator": "loo"}, "no form for the 'loo' estimator"),
])
def test_query_path_bad_inputs(kwargs, message):
    model = nn.Linear(3, 1)
    with pytest.raises(ConfigurationError, match=message):
        ShapleyTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), val_data=(torch.randn(4, 3), torch.randn(4, 1)),
                       val_loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1), **kwargs)


def test_auto_never_approximates_adam_preconditioner():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tr = ShapleyTracker(model, opt, val_data=seqs(3, 1), val_loss_fn=row_losses, per_query=True)
    sgd_form = ShapleyTracker(model, opt, val_data=seqs(3, 1), val_loss_fn=row_losses, per_query=True, estimator="sgd")
    tr.begin_batch(torch.arange(4))
    sgd_form.begin_batch(torch.arange(4))
    row_losses(model, seqs(4, 2)).mean().backward()
    for t in (tr, sgd_form):
        t.after_backward()
        t.end_batch()
    opt.step()
    plan = {r.module: r for r in tr.query_plan}
    for name in ("up", "head"):
        assert plan[name].path == "exact" and "approximate" in plan[name].reason
    assert plan["emb"].exact_flops is not None  # embeddings stay eligible: their ghost form keeps P exact
    assert {r.module: r.path for r in sgd_form.query_plan}["up"] == (
        "ghost" if {r.module: r for r in sgd_form.query_plan}["up"].ghost_flops
        < {r.module: r for r in sgd_form.query_plan}["up"].exact_flops else "exact")
