"""Group-name helpers shared by the weighting modules (inrun_shapley.posthoc.weighting.groups)."""

from __future__ import annotations

import pytest
from torch import nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.weighting import GroupComponents, GroupWeights, ParameterGroups
from inrun_shapley.posthoc.weighting.groups import check_same_names, check_unique_names, listing, names_of


def test_listing_truncates_long_lists():
    assert listing(["a", "b"]) == "'a', 'b'"
    assert listing([str(k) for k in range(15)], limit=3) == "'0', '1', '2', ... (12 more)"
    assert listing([]) == ""


def test_names_of_groups_or_plain_names():
    groups = ParameterGroups.per_module(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
    assert names_of(groups) == ("0", "1")
    assert names_of(["x", "y"]) == ("x", "y")


@pytest.mark.parametrize(
    "target, source, message",
    [
        (["a", "a"], ["a"], "the target lists duplicate group names: 'a'"),
        (["a", "b"], ["a", "c"], "in the target but not in the weights: 'b'; in the weights but not in the target: 'c'"),
        (["a"], ["a", "c"], "in the target but not in the weights: none"),
    ],
)
def test_check_same_names_lists_both_directions(target, source, message):
    with pytest.raises(ConfigurationError, match=message):
        check_same_names(target, source, "the target", "the weights")


def test_same_names_in_another_order_pass():
    check_same_names(["b", "a"], ["a", "b"], "the target", "the weights")


@pytest.mark.parametrize(
    "build",
    [
        lambda: check_unique_names(("a", "a")),
        lambda: GroupWeights(("a", "a"), [1.0, 1.0]),
        lambda: GroupComponents([[[1.0]], [[2.0]]], ("a", "a")),
    ],
    ids=["helper", "weights", "components"],
)
def test_duplicate_group_names_are_refused_everywhere(build):
    with pytest.raises(ConfigurationError, match=r"duplicate group names: \('a', 'a'\)"):
        build()
