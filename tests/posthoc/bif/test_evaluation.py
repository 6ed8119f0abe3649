"""Evaluating traced samples in fixed-order chunks (inrun_shapley.posthoc.bif.evaluation)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif.evaluation import evaluate, iter_chunks

X = torch.arange(10.0).reshape(5, 2)
Y = torch.arange(5.0)
Pair = namedtuple("Pair", ["x", "y"])


@pytest.mark.parametrize(
    "batch, first_rows",
    [
        (X, lambda c: c),
        ((X, Y), lambda c: c[0]),
        ([X, Y], lambda c: c[0]),
        ({"x": X, "meta": {"y": Y}}, lambda c: c["x"]),
        (Pair(X, Y), lambda c: c.x),
    ],
    ids=["tensor", "tuple", "list", "nested-dict", "named-tuple"],
)
def test_in_memory_batches_are_cut_in_order_keeping_their_structure(batch, first_rows):
    chunks = list(iter_chunks(batch, 2, "train_samples"))
    assert len(chunks) == 3
    assert [type(c) for c in chunks] == [type(batch)] * 3
    assert torch.equal(torch.cat([first_rows(c) for c in chunks]), X)


def test_non_tensor_leaves_ride_along_and_small_batches_stay_whole():
    chunks = list(iter_chunks((X, "tag"), 2, "queries"))
    assert [c[1] for c in chunks] == ["tag"] * 3
    assert list(iter_chunks((X, Y), 5, "queries"))[0][0] is X
    assert list(iter_chunks((X, Y), None, "queries"))[0][0] is X


def test_shuffling_loader_is_refused_and_ordered_loader_is_passed_through():
    data = TensorDataset(X, Y)
    with pytest.raises(ConfigurationError, match="shuffle=False"):
        list(iter_chunks(DataLoader(data, batch_size=2, shuffle=True), 2, "queries"))
    chunks = list(iter_chunks(DataLoader(data, batch_size=4), 2, "queries"))
    assert [len(c[0]) for c in chunks] == [4, 1]


def _model() -> nn.Module:
    return nn.Linear(2, 1, bias=False)


def test_evaluate_averages_trailing_dims_for_training_samples_only():
    def per_token(model, chunk):
        return torch.stack([chunk[:, 0], chunk[:, 1]], dim=1)  # [B, 2]

    train = evaluate(_model(), per_token, X, 2, "train_samples", per_sample=True)
    queries = evaluate(_model(), per_token, X, 2, "queries", per_sample=False)
    assert torch.equal(train, X.mean(dim=1))
    assert torch.equal(queries, X)


@pytest.mark.parametrize(
    "fn, source, message",
    [
        (lambda m, c: c.sum(), X, "got a scalar tensor"),
        (lambda m, c: c.tolist(), X, "got list"),
        (lambda m, c: c[:, : len(c)], X, "different per-sample shapes"),
        (lambda m, c: c[:, 0], DataLoader(TensorDataset(X[:0]), batch_size=2), "no batch to evaluate"),
    ],
    ids=["scalar", "not-a-tensor", "ragged", "empty"],
)
def test_evaluate_errors(fn, source, message):
    with pytest.raises(ConfigurationError, match=message):
        evaluate(_model(), fn, source, 2, "queries", per_sample=False)
