"""The LDS harness (``benchmarks.lds_harness``), its baselines and the quality command (quick mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import lds_harness, quality
from benchmarks.lds_harness import LDSSetup, Recipe, TrainCallback, build_noisy_setup, build_setup


def synthetic_setup(n_train=200, n_queries=30, n_models=150, noise=0.0, seed=0) -> tuple[LDSSetup, np.ndarray]:
    """An LDSSetup whose outputs are exactly linear in the subsets (ground-truth scores known)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n_train, n_queries))
    subsets = rng.random((n_models, n_train)) < 0.5
    outputs = subsets @ truth + noise * rng.normal(size=(n_models, n_queries))
    empty = torch.zeros(0)
    setup = LDSSetup(
        recipe=Recipe(), x_train=torch.zeros(n_train, 64), y_train=torch.zeros(n_train, dtype=torch.long),
        x_query=torch.zeros(n_queries, 64), y_query=torch.zeros(n_queries, dtype=torch.long),
        y_train_clean=torch.zeros(n_train, dtype=torch.long), flipped=np.zeros(n_train, bool),
        subsets=subsets, outputs={"margin": outputs, "loss": -outputs}, full_outputs={},
        full_state={"w": empty}, checkpoints=[], config={},
    )
    return setup, truth


def test_lds_of_perfect_scores_is_one_and_of_random_scores_is_zero():
    setup, truth = synthetic_setup()
    perfect = setup.evaluate(truth)
    assert perfect.mean == pytest.approx(1.0, abs=1e-9)
    assert setup.evaluate(-truth, output="loss").mean == pytest.approx(1.0, abs=1e-9)
    assert setup.evaluate(-truth).mean == pytest.approx(-1.0, abs=1e-9)
    rand = setup.evaluate(np.random.default_rng(1).normal(size=truth.shape))
    assert abs(rand.mean) < 0.1
    assert rand.per_query.shape == (truth.shape[1],)
    noisy, truth2 = synthetic_setup(noise=5.0)
    assert 0.3 < noisy.evaluate(truth2).mean < 0.99  # noise in the outputs lowers the bar


def test_evaluate_and_flip_auc_reject_what_they_cannot_judge():
    setup, truth = synthetic_setup()
    with pytest.raises(ValueError, match="flipped labels"):
        setup.flip_auc(truth)
    with pytest.raises(ValueError, match="shapes disagree"):
        setup.evaluate(truth[:-1])


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lds_cache")


def test_quick_build_caches_and_reloads_identically(quick_cache):
    built = build_setup(quick_cache, quick=True)
    assert built.timings  # trained now
    loaded = build_setup(quick_cache, quick=True)
    assert not loaded.timings and loaded.path == built.path  # read from the cache
    assert loaded.recipe == built.recipe
    for name in ("x_train", "y_train", "x_query", "y_query"):
        assert torch.equal(getattr(built, name), getattr(loaded, name))
    assert np.array_equal(built.subsets, loaded.subsets)
    for k in ("margin", "loss"):
        assert np.array_equal(built.outputs[k], loaded.outputs[k])
    assert built.full_state.keys() == loaded.full_state.keys()
    assert all(torch.equal(built.full_state[k], loaded.full_state[k]) for k in built.full_state)
    assert len(loaded.checkpoints) == built.recipe.n_checkpoints + 1
    n, m = built.n_train, len(built.subsets)
    assert built.subsets.shape == (m, n) and (built.subsets.sum(1) == n // 2).all()
    assert built.outputs["margin"].shape == (m, built.n_queries)


def test_train_full_reproduces_the_cached_model_and_calls_the_callback(quick_cache):
    setup = build_setup(quick_cache, quick=True)

    class Counter(TrainCallback):
        def __init__(self):
            self.starts, self.contexts, self.steps, self.ids = 0, 0, [], []

        def on_train_start(self, model, optimizer):
            self.starts += 1

        def batch(self, step, ids):
            outer = self

            class Ctx:
                def __enter__(self):
                    outer.contexts += 1

                def __exit__(self, *exc):
                    return False

            return Ctx()

        def on_step_end(self, step, model, optimizer, ids, loss):
            self.steps.append(step)
            self.ids.append(ids)

    cb = Counter()
    model = setup.train_full(cb)
    total = setup.recipe.steps(setup.n_train)
    assert cb.starts == 1 and cb.contexts == total and cb.steps == list(range(1, total + 1))
    assert torch.equal(torch.cat(cb.ids[: -(-setup.n_train // setup.recipe.batch_size)]).sort().values,
                       setup.train_ids)  # one epoch = every id once
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, setup.full_state[k], rtol=1e-5, atol=1e-6)
    margins = lds_harness.margin_fn(model, setup.query_set).detach().numpy()
    np.testing.assert_allclose(margins, setup.full_outputs["margin"], rtol=1e-4, atol=1e-5)


def test_noisy_setup_flips_the_asked_fraction(quick_cache):
    noisy = build_noisy_setup(0.2, quick_cache, quick=True)
    assert noisy.flipped.sum() == round(0.2 * noisy.n_train)
    changed = (noisy.y_train != noisy.y_train_clean).numpy()
    assert np.array_equal(changed, noisy.flipped)
    perfect = np.where(noisy.flipped, -1.0, 1.0)[:, None] * np.ones((1, noisy.n_queries))
    assert noisy.flip_auc(perfect) == 1.0


@pytest.mark.slow
def test_quality_quick_runs_our_reference_methods(quick_cache, tmp_path):
    out = tmp_path / "results.md"
    rows = quality.main(["--quick", "--only", "ours", "--cache-dir", str(quick_cache), "--out", str(out)])
    assert [r.method for r in rows] == list(quality.OURS)
    for r in rows:
        assert r.status == "ok", r.status
        assert np.isfinite(r.lds_mean) and r.lds_mean > 0.2  # far above random on the quick setup
        assert 0.0 <= float(r.auc) <= 1.0
    text = out.read_text()
    assert "| method |" in text and "machine:" in text and "command:" in text


def test_quality_reports_a_failing_method_instead_of_dropping_it(quick_cache, monkeypatch):
    def broken(setup):
        raise RuntimeError("boom")

    monkeypatch.setitem(quality.METHODS, "broken", broken)
    rows = quality.main(["--quick", "--only", "broken", "--cache-dir", str(quick_cache), "--no-auc"])
    assert rows[0].status == "failed: RuntimeError: boom"


def test_quick_peers_run_when_installed(quick_cache):
    pytest.importorskip("kronfluence")
    rows = quality.main(["--quick", "--only", "kronfluence EK-FAC", "--cache-dir", str(quick_cache), "--no-auc"])
    assert rows[0].status == "ok", rows[0].status
    assert rows[0].lds_mean > 0.2
