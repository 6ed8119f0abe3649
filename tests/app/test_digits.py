"""The shared digits split and label flips (``inrun_shapley.app.digits``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrun_shapley.app.digits import flip_labels, load_digits_splits, mlp
from inrun_shapley.errors import ConfigurationError


def test_splits_partition_the_shuffled_digits():
    parts = load_digits_splits((1000, 400, None), 0, scale="unit")
    assert [len(x) for x, _ in parts] == [1000, 400, 397]
    x = torch.cat([p[0] for p in parts])
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    unshuffled = load_digits_splits((None,), None, scale="unit")[0][0]
    order = np.random.default_rng(0).permutation(1797)
    assert torch.equal(x, unshuffled[order])


def test_standardize_uses_the_first_split_and_floors_the_scale():
    (x, _), (v, _) = load_digits_splits((500, 100), 1, scale="standardize")
    torch.testing.assert_close(x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    assert float(x.std(0, unbiased=False).max()) <= 1.0 + 1e-5  # floored scale never inflates
    assert float(v.abs().max()) <= 16.0  # a pixel blank in training cannot blow up later rows


def test_one_generator_draw_then_flips_continue_from_it():
    a = np.random.default_rng(5)
    (_, y), = load_digits_splits((300,), a)
    noisy, flipped = flip_labels(y, 0.1, a)
    assert flipped.sum() == 30 and isinstance(noisy, torch.Tensor)
    assert (noisy.numpy() != y.numpy()).tolist() == flipped.tolist()
    assert ((noisy >= 0) & (noisy < 10)).all()
    b = np.random.default_rng(5)
    b.permutation(1797)
    assert flip_labels(y.numpy(), 0.1, b)[1].tolist() == flipped.tolist()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: load_digits_splits((10,), scale="minmax"), "scale must be one of"),
        (lambda: load_digits_splits((1000, 1000)), "ask for 2000 rows"),
        (lambda: load_digits_splits((None, 10)), "only the last may be None"),
        (lambda: flip_labels(np.zeros(5, np.int64), 1.5, 0), r"in \[0, 1\]"),
        (lambda: mlp((4,), activation="gelu"), "activation must be"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ConfigurationError, match=match):
        call()


def test_seeded_mlp_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a, b = mlp((8, 8), seed=3), mlp((8, 8), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [type(m).__name__ for m in mlp((), seed=0)] == ["Linear"]
