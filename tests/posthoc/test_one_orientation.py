"""One orientation for every score (issue 25): positive = helpful, numpy, ``fn(model, batch)``.

A toy with an atypical query (a class-0 point deep in class 1's region), a training row that
duplicates it and a copy with the wrong label: every method, at its defaults, must put the
duplicate on top and the wrong-label copy below it, in the same orientation, as numpy arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inrun_shapley import ShapleyLog, ShapleyLogWriter, ShapleyTracker, TrajectoryRecorder, adjoint_influence
from inrun_shapley.posthoc.bif import BIFConfig, bayesian_influence
from inrun_shapley.posthoc.weighting import GroupWeights, compute_group_components, reweigh

N, DUP, WRONG = 26, 24, 25


def loss_rows(m, b):
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    xq, yq = torch.tensor([[1.5, 0.3]], dtype=torch.float64), torch.tensor([0])  # atypical query
    X, Y = torch.cat([x, xq, xq]), torch.cat([y, yq, 1 - yq])  # row 24 = duplicate, 25 = wrong label
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    tracker = ShapleyTracker(model, opt, val_data=(xq, yq), val_loss_fn=loss_rows,
                             sink=ShapleyLogWriter(root / "log"))
    recorder = TrajectoryRecorder(root / "rec")
    tracker.add_step_listener(recorder)
    order = torch.Generator().manual_seed(1)
    for _ in range(6):
        for ids in torch.randperm(N, generator=order).split(13):
            with tracker.batch(ids):
                loss_rows(model, (X[ids], Y[ids])).mean().backward()
            opt.step()
            opt.zero_grad()
    tracker.close()
    recorder.close()
    return model, X, Y, (xq, yq), tracker, root


def _check(scores, name, shape):
    assert isinstance(scores, np.ndarray) and scores.shape == shape, (name, type(scores), getattr(scores, "shape", None))
    flat = scores.reshape(scores.shape[0], -1)[:, 0]
    assert int(np.argmax(flat)) == DUP, (name, np.argsort(-flat)[:5], flat[DUP], flat[WRONG])
    assert flat[WRONG] < flat[DUP] and flat[WRONG] < 0, (name, flat[DUP], flat[WRONG])


def test_in_run_values(trained):
    _, _, _, _, tracker, root = trained
    _check(tracker.values, "tracker.values", (N,))
    _check(ShapleyLog.load(root / "log").helpfulness(), "ShapleyLog.helpfulness", (N,))


def test_adjoint_influence(trained):
    model, X, Y, query, _, root = trained
    scores = adjoint_influence(model, root / "rec", (X, Y), loss_rows, query, progress=False)
    _check(scores, "adjoint_influence", (N, 1))


def test_bayesian_influence(trained):
    model, X, Y, query, _, _ = trained
    loader = DataLoader(TensorDataset(X, Y), batch_size=13, shuffle=True)
    result = bayesian_influence(model, loss_rows, loader, (X, Y), query, BIFConfig(), progress=False)
    _check(result.helpfulness, "bayesian_influence(...).helpfulness", (N, 1))
    np.testing.assert_array_equal(result.helpfulness, -result.influence.numpy())  # the query loss: flipped


def test_weighting_components(trained):
    model, X, Y, query, _, _ = trained
    comps = compute_group_components(model, loss_rows, (X, Y), query, "tensor")
    _check(np.asarray(reweigh(comps, GroupWeights.uniform(comps.group_names))), "reweigh(components)", (N, 1))


def test_old_loss_spelling_still_works_with_a_warning_naming_the_new_one(trained):
    model, X, Y, query, _, _ = trained
    new = compute_group_components(model, loss_rows, (X, Y), query, "tensor")
    with pytest.warns(DeprecationWarning, match=r"loss_fn=fn\(model, batch\)"):
        old = compute_group_components(model, F.cross_entropy, (X, Y), query, "tensor")
    np.testing.assert_allclose(old.values, new.values, rtol=1e-10, atol=1e-14)


def test_lds_takes_the_one_orientation():
    from inrun_shapley.metrics import linear_datamodeling_score

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 3))
    subsets = rng.random((30, 20)) < 0.5
    utility = subsets @ scores + 0.1 * rng.normal(size=(30, 3))
    assert linear_datamodeling_score(scores, subsets, utility) > 0.9
    assert linear_datamodeling_score(scores, subsets, -utility, output_kind="loss") == \
        linear_datamodeling_score(scores, subsets, utility)
