"""Tests for learned parameter-group weights (inrun_shapley.posthoc.weighting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from inrun_shapley.errors import ConfigurationError, UnsupportedOptimizerError
from inrun_shapley.posthoc.weighting import (
    FitConfig,
    GroupComponents,
    GroupWeights,
    ParameterGroups,
    adam_preconditioner,
    compute_group_components,
    fit_group_weights,
    fit_weights,
    group_weight_objective,
    plot_group_weights,
    reweigh,
    reweigh_group_values,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _oracle_grads(model, state, x, y, loss_fn=F.cross_entropy) -> torch.Tensor:
    """Per-sample flat gradients [n, d], one autograd call per sample (independent of vmap)."""
    model = type(model)(*[m for m in model])  # same modules; parameters swapped below
    names = [n for n, _ in model.named_parameters()]
    params = {n: state[n].detach().clone().requires_grad_(True) for n in names}
    rows = []
    for i in range(len(x)):
        out = torch.func.functional_call(model, params, (x[i : i + 1],))
        gs = torch.autograd.grad(loss_fn(out, y[i : i + 1]), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _slices(model) -> dict[str, slice]:
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


# ---------------------------------------------------------------------------------------------
# Exactness of the decomposition
# ---------------------------------------------------------------------------------------------


def test_group_parts_sum_to_full_dot_product_over_checkpoints_with_preconditioner(tmp_path):
    model = _mlp()
    x, y = _data(23)
    xq, yq = _data(4, seed=2)
    s0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    s1 = {n: p + 0.1 * torch.randn_like(p) for n, p in s0.items()}
    torch.save({"state_dict": s1}, tmp_path / "c1.pt")
    precs = [None, {n: torch.rand_like(p) + 0.5 for n, p in s0.items()}]
    lrs = [0.3, 0.7]
    comps = compute_group_components(
        model, F.cross_entropy, (x, y), (xq, yq), "tensor",
        checkpoints=[s0, tmp_path / "c1.pt"], lrs=lrs, preconditioner=precs, batch_size=5,
    )
    assert comps.values.shape == (4, 23, 4)
    assert comps.method == "grad_dot+precond"
    sl = _slices(model)
    full = np.zeros((23, 4))
    per_group = np.zeros((4, 23, 4))
    for state, lr, pc in zip([s0, s1], lrs, precs):
        gi, gq = _oracle_grads(model, state, x, y), _oracle_grads(model, state, xq, yq)
        if pc is not None:
            gi = gi * torch.cat([pc[n].reshape(-1) for n in sl])
        full += lr * (gi @ gq.T).numpy()
        for j, n in enumerate(sl):
            per_group[j] += lr * (gi[:, sl[n]] @ gq[:, sl[n]].T).numpy()
    np.testing.assert_allclose(comps.total(), full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(comps.values, per_group, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(reweigh(comps, GroupWeights.uniform(comps.group_names)), full, rtol=1e-10)


def test_components_leave_model_untouched_and_sign_convention():
    model = _mlp()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _data(6)
    comps = compute_group_components(model, F.cross_entropy, (x, y), (x, y), "module")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.training and all(m.training for m in model.modules())
    # Self-influence is a squared norm: positive (a step on i lowers i's own loss).
    assert np.all(np.diag(comps.total()) > 0)


def test_projection_is_per_group_seeded_and_exact_when_wide():
    model = _mlp()
    x, y = _data(10)
    exact = compute_group_components(model, F.cross_entropy, (x, y), (x[:3], y[:3]), "module")
    wide = compute_group_components(
        model, F.cross_entropy, (x, y), (x[:3], y[:3]), "module", projection_dim=1000
    )
    np.testing.assert_allclose(wide.values, exact.values, rtol=1e-12)
    a = compute_group_components(model, F.cross_entropy, (x, y), (x[:3], y[:3]), "module", projection_dim=4, seed=3)
    b = compute_group_components(model, F.cross_entropy, (x, y), (x[:3], y[:3]), "module", projection_dim=4, seed=3)
    c = compute_group_components(model, F.cross_entropy, (x, y), (x[:3], y[:3]), "module", projection_dim=4, seed=4)
    assert a.method == "grad_dot+proj4"
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(a.values, c.values)
    np.testing.assert_allclose(a.total(), a.values.sum(0))


def test_cache_round_trip_and_stale_cache_error(tmp_path):
    model = _mlp()
    x, y = _data(8)
    path = tmp_path / "comps.npz"
    first = compute_group_components(model, F.cross_entropy, (x, y), (x[:2], y[:2]), cache_path=path)
    assert path.exists()
    again = compute_group_components(model, F.cross_entropy, (x, y), (x[:2], y[:2]), cache_path=path)
    np.testing.assert_array_equal(first.values, again.values)
    assert again.group_names == first.group_names and again.fingerprint == first.fingerprint
    with pytest.raises(ConfigurationError, match="computed from other inputs"):
        compute_group_components(model, F.cross_entropy, (x, y), (x[:3], y[:3]), cache_path=path)


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------


def test_group_constructors():
    model = _mlp()
    assert ParameterGroups.per_tensor(model).names == ("0.weight", "0.bias", "2.weight", "2.bias")
    mod = ParameterGroups.per_module(model)
    assert mod.names == ("0", "2") and mod.members["2"] == ("2.weight", "2.bias")
    pat = ParameterGroups.by_pattern(model, {r"\.weight$": "weights"}, default="other")
    assert pat.names == ("weights", "other")
    assert pat.group_of("0.bias") == "other" and pat.index_of("weights") == 0
    d = ParameterGroups.from_dict(model, {"out": ["2.bias", "2.weight"], "in": ["0.weight", "0.bias"]})
    assert d.names == ("out", "in") and d.members["out"] == ("2.weight", "2.bias")
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    assert ParameterGroups.per_module(nested, depth=1).names == ("0", "1")


def _frozen_model():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: ParameterGroups.from_dict(m, {"a": ["0.weight", "0.bias", "2.weight"]}), r"in no group: '2\.bias'"),
        (lambda m: ParameterGroups.from_dict(m, {"a": ["0.weight", "0.bias"], "b": ["0.bias", "2.weight", "2.bias"]}),
         r"more than one group: '0\.bias' in \['a', 'b'\]"),
        (lambda m: ParameterGroups.from_dict(m, {"a": ["0.weight", "0.bias", "2.weight", "2.bias", "9.w"]}),
         r"not trainable parameters of the model: '9\.w'"),
        (lambda m: ParameterGroups.from_dict(m, {"a": ["0.weight", "0.bias", "2.weight", "2.bias"], "b": []}),
         r"empty groups: 'b'"),
        (lambda m: ParameterGroups.by_pattern(m, {r"weight": "w", r"^0\.": "first"}, default="rest"),
         r"more than one group: '0\.weight'"),
        (lambda m: ParameterGroups.by_pattern(m, {r"weight": "w"}), r"in no group: '0\.bias', '2\.bias'"),
        (lambda m: ParameterGroups.by_pattern(m, {r"weight": "w", r"nothing": "n"}, default="rest"), r"empty groups: 'n'"),
        (lambda m: ParameterGroups.by_pattern(m, {r"(": "w"}), r"invalid regex"),
        (lambda m: ParameterGroups.per_module(m, depth=0), r"depth must be >= 1"),
        (lambda m: ParameterGroups.resolve(m, "layer"), r"groups must be 'tensor', 'module'"),
    ],
)
def test_group_assignment_errors(build, message):
    with pytest.raises(ConfigurationError, match=message):
        build(_mlp())


def test_frozen_parameters_are_excluded_and_refused():
    model = _frozen_model()
    assert "0.bias" not in ParameterGroups.per_tensor(model).param_names
    with pytest.raises(ConfigurationError, match=r"frozen parameters .* '0\.bias'"):
        ParameterGroups.from_dict(model, {"a": ["0.weight", "0.bias", "2.weight", "2.bias"]})
    with pytest.raises(ConfigurationError, match="built for another set of trainable parameters"):
        ParameterGroups.resolve(model, ParameterGroups.per_tensor(_mlp()))
    x, y = _data(5)
    comps = compute_group_components(model, F.cross_entropy, (x, y), (x, y), "tensor")
    assert comps.group_names == ("0.weight", "2.weight", "2.bias")


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def _synthetic(n_train=200, n_query=30, G=5, signal=2, seed=0) -> GroupComponents:
    """Only group ``signal`` singles out a few training samples per query; the rest is noise."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 1.0, size=(G, n_train, n_query))
    values[signal] = rng.normal(0.0, 0.1, size=(n_train, n_query))
    for q in range(n_query):
        values[signal, rng.choice(n_train, min(8, n_train), replace=False), q] += 3.0
    return GroupComponents(values, [f"g{j}" for j in range(G)], "synthetic")


def test_fit_recovers_the_signal_group_and_objective_decreases():
    comps = _synthetic()
    w = fit_weights(comps, FitConfig(top_k=8, penalty=0.01, steps=150, lr=0.1, restarts=1))
    others = np.delete(w.weights, 2)
    assert w.weights[2] > 2.0 * others.max()
    assert np.isclose(w.weights.sum(), 5.0)
    assert w.objective_trace[0] == w.fit_info["uniform_objective"]
    assert w.objective_trace[-1] < w.objective_trace[0] - 0.05
    theta = torch.as_tensor(np.log(w.weights))
    final = group_weight_objective(theta, torch.as_tensor(comps.values / np.abs(comps.values).max()), 8, 0.01)
    assert float(final) == pytest.approx(w.objective_trace.min(), abs=1e-9)


def test_restarts_pick_the_lowest_objective():
    comps = _synthetic(seed=3)
    w = fit_weights(comps, FitConfig(top_k=8, steps=60, restarts=4))
    info = w.fit_info
    assert len(info["restart_objectives"]) == 4
    assert w.objective_trace.min() == pytest.approx(min(info["restart_objectives"]))
    assert w.objective_trace.min() <= info["uniform_objective"]
    assert int(np.argmax(w.weights)) == 2


def test_fit_is_deterministic_for_a_seed_and_lbfgs_works():
    comps = _synthetic(seed=1)
    cfg = FitConfig(top_k=5, steps=40, max_queries=12, restarts=3, init_noise=0.3, seed=7)
    a, b = fit_weights(comps, cfg), fit_weights(comps, cfg)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.objective_trace, b.objective_trace)
    c = fit_weights(comps, FitConfig(top_k=5, steps=40, max_queries=12, restarts=3, init_noise=0.3, seed=8))
    assert not np.array_equal(a.weights, c.weights)
    lb = fit_weights(comps, FitConfig(top_k=8, optimizer="lbfgs", lr=1.0, steps=50, penalty_kind="kl",
                                      penalty=0.01, restarts=1))
    assert lb.objective_trace.min() < lb.objective_trace[0]
    assert int(np.argmax(lb.weights)) == 2


def test_penalty_pulls_toward_uniform():
    comps = _synthetic(seed=2)
    loose = fit_weights(comps, FitConfig(penalty=0.0, steps=100, restarts=1))
    tight = fit_weights(comps, FitConfig(penalty=100.0, steps=100, restarts=1))
    assert np.abs(tight.weights - 1).max() < np.abs(loose.weights - 1).max()


def test_fit_group_weights_per_aspect():
    out = fit_group_weights({"a": _synthetic(signal=0), "b": _synthetic(signal=4)}, FitConfig(steps=100, lr=0.1, restarts=2))
    assert set(out) == {"a", "b"} and out["a"].aspect == "a"
    assert int(np.argmax(out["a"].weights)) == 0 and int(np.argmax(out["b"].weights)) == 4
    other = GroupComponents(np.zeros((2, 3, 4)), ["x", "y"])
    with pytest.raises(ConfigurationError, match="other group names"):
        fit_group_weights({"a": _synthetic(), "b": other})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"penalty": -1.0}, "penalty must be >= 0"),
        ({"penalty_kind": "l1"}, "penalty_kind must be"),
        ({"optimizer": "sgd"}, "optimizer must be"),
        ({"steps": 0, "lr": 0.0}, "steps must be >= 1.*lr must be > 0"),
        ({"restarts": 0}, "restarts must be >= 1"),
    ],
)
def test_fit_config_errors(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        FitConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Weights: persistence, alignment, reports
# ---------------------------------------------------------------------------------------------


def test_weights_save_load_round_trip_and_group_mismatch(tmp_path):
    w = GroupWeights(("a", "b", "c"), [0.5, 2.0, 0.5], aspect="digits", objective_trace=[-0.1, -0.2],
                     config={"top_k": 3}, fit_info={"winner": 0})
    w.save(tmp_path / "w.json")
    back = GroupWeights.load(tmp_path / "w.json")
    assert back.group_names == w.group_names and back.aspect == "digits" and back.config == {"top_k": 3}
    assert back.fit_info == {"winner": 0}
    np.testing.assert_array_equal(back.weights, w.weights)
    np.testing.assert_array_equal(back.objective_trace, w.objective_trace)
    reordered = GroupWeights.load(tmp_path / "w.json", groups=["c", "b", "a"])
    assert reordered.group_names == ("c", "b", "a") and reordered.as_dict() == w.as_dict()
    with pytest.raises(ConfigurationError, match=r"in the target but not in the weights: 'd'; in the weights but not in the target: 'c'"):
        GroupWeights.load(tmp_path / "w.json", groups=["a", "b", "d"])
    (tmp_path / "bad.json").write_text(json.dumps({"weights": [1]}))
    with pytest.raises(ConfigurationError, match="not a group-weights file"):
        GroupWeights.load(tmp_path / "bad.json")
    with pytest.raises(ConfigurationError, match="non-negative"):
        GroupWeights(("a",), [-1.0])


def test_components_npz_round_trip(tmp_path):
    comps = _synthetic(n_train=7, n_query=3, G=2, signal=1)
    comps.save(tmp_path / "c.npz")
    back = GroupComponents.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.values, comps.values)
    assert back.group_names == comps.group_names and back.method == "synthetic"
    with pytest.raises(ConfigurationError, match=r"must be \[G, n_train, n_query\]"):
        GroupComponents(np.zeros((2, 3)), ["a", "b"])


def test_reweigh_aligns_by_name():
    comps = GroupComponents(np.arange(24, dtype=float).reshape(2, 3, 4), ["x", "y"])
    w = GroupWeights(("y", "x"), [3.0, 0.5])
    np.testing.assert_allclose(reweigh(comps, w), 0.5 * comps.values[0] + 3.0 * comps.values[1])
    np.testing.assert_allclose(reweigh(comps.values, [0.5, 3.0]), reweigh(comps, w))
    with pytest.raises(ConfigurationError, match="do not match"):
        reweigh(comps, GroupWeights(("x", "z"), [1.0, 1.0]))


def test_reweigh_group_values_alignment():
    values = np.array([[1.0, 10.0, 100.0], [2.0, 20.0, 200.0]])
    names = ["attn", "mlp", "embed"]
    w = GroupWeights(("embed", "attn", "mlp"), [0.0, 2.0, 1.0])
    np.testing.assert_allclose(reweigh_group_values(values, names, w), [12.0, 24.0])
    np.testing.assert_allclose(reweigh_group_values(values, names, {"mlp": 1, "embed": 0, "attn": 2}), [12.0, 24.0])
    with pytest.raises(ConfigurationError, match=r"in the logged values but not in the weights: 'mlp'; in the weights but not in the logged values: 'ffn'"):
        reweigh_group_values(values, names, {"attn": 1, "ffn": 1, "embed": 1})
    with pytest.raises(ConfigurationError, match=r"must be \[n_ids, 2\]"):
        reweigh_group_values(values, names[:2], w)
    with pytest.raises(ConfigurationError, match="duplicate group names"):
        reweigh_group_values(values, ["attn", "attn", "embed"], w)


def test_table_and_plot(tmp_path):
    w = GroupWeights(("layer.0", "layer.1"), [1.5, 0.5], aspect="digits")
    text = w.table()
    assert "aspect: digits" in text and "layer.0" in text and "75.00%" in text and "0.5000" in text
    out = plot_group_weights({"a": w, "b": GroupWeights.uniform(w.group_names)}, tmp_path / "w.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adam_preconditioner_matches_formula():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    x, y = _data(9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    pc = adam_preconditioner(opt, model)
    v = opt.state[model[0].weight]["exp_avg_sq"]
    np.testing.assert_allclose(pc["0.weight"], 1 / ((v / (1 - 0.99**3)).sqrt() + 1e-6))
    with pytest.raises(UnsupportedOptimizerError, match="exp_avg_sq"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        sgd.step()
        adam_preconditioner(sgd, model)
    with pytest.raises(ConfigurationError, match="no optimizer state"):
        adam_preconditioner(torch.optim.Adam(model.parameters()), model)
