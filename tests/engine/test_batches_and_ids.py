"""Batch-structure helpers and the one sample-id check."""

from __future__ import annotations

from collections import namedtuple

import pytest
import numpy as np
import torch

from inrun_shapley.batches import detach, leading_dim, move_to, rows_of, slice_rows, take_rows
from inrun_shapley.engine.ids import as_sample_ids, sum_occurrences
from inrun_shapley.errors import ConfigurationError, SampleIdError

Pair = namedtuple("Pair", "x y")


def nested():
    return {"a": (torch.arange(8.0).reshape(4, 2).requires_grad_(), [torch.arange(4), "tag"]),
            "b": Pair(torch.ones(4, 3), 7)}


def test_rows_take_slice_keep_the_structure():
    batch = nested()
    assert rows_of(batch) == 4 and leading_dim(batch) == 4
    got = take_rows(batch, torch.tensor([3, 1]))
    assert got["a"][0].tolist() == [[6.0, 7.0], [2.0, 3.0]]
    assert got["a"][1][0].tolist() == [3, 1] and got["a"][1][1] == "tag"
    assert isinstance(got["b"], Pair) and got["b"].y == 7 and got["b"].x.shape == (2, 3)
    part = slice_rows(batch, 1, 3)
    assert part["a"][1][0].tolist() == [1, 2] and isinstance(part["a"], tuple) and isinstance(part["a"][1], list)


def test_detach_and_move_to():
    batch = nested()
    d = detach(batch)
    assert not d["a"][0].requires_grad and d["a"][0].data_ptr() == batch["a"][0].data_ptr()
    m = move_to(batch, torch.device("cpu"))
    assert m["b"].x.device.type == "cpu" and m["a"][1][1] == "tag"


def test_rows_of_without_tensors_raises():
    assert leading_dim(("x", 3, torch.tensor(1.0))) is None
    with pytest.raises(ConfigurationError, match="cannot find the rows of the validation set"):
        rows_of(("x", 3), what="validation set")


@pytest.mark.parametrize(
    "ids, message",
    [
        (None, "no sample ids"),
        ([], "empty"),
        ([[0, 1]], "1-D"),
        ([0.5, 1.5], "must be integers"),
        ([True, False], "must be integers"),
        ([-1, 2], "non-negative"),
    ],
)
def test_bad_sample_ids(ids, message):
    with pytest.raises(SampleIdError, match=message):
        as_sample_ids(ids)


def test_good_sample_ids_become_int64_cpu():
    for ids in ([3, 1], torch.tensor([3, 1], dtype=torch.int32), torch.tensor([3, 1]).numpy()):
        t = as_sample_ids(ids)
        assert t.dtype == torch.int64 and t.tolist() == [3, 1]


def test_repeated_ids_are_kept_and_summed_per_id():
    assert as_sample_ids([5, 3, 3]).tolist() == [5, 3, 3]  # sampling with replacement
    ids, vals, groups, counts = sum_occurrences(np.array([5, 3, 3]), np.array([1.0, 2.0, 4.0]),
                                                np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 4.0]]))
    assert ids.tolist() == [3, 5] and vals.tolist() == [6.0, 1.0] and counts.tolist() == [2, 1]
    assert groups.tolist() == [[2.0, 4.0], [1.0, 0.0]]
    same = sum_occurrences(np.array([2, 1]), np.array([0.5, 0.25]), None)
    assert same[0].tolist() == [2, 1] and same[3] is None
