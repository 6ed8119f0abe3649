"""A resumed training run continues the same recording (``resume=True``); an existing folder is
never silently replaced or mixed into."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrun_shapley import ConfigurationError, ShapleyTracker
from inrun_shapley.trajectory import Recording, TrajectoryRecorder
from tests.posthoc.adjoint.test_adjoint import OPTIMIZERS, batch_ids, data, loss_fn, make_model, run_adjoint


def steps(model, opt, rec, first, last):
    x, y, _ = data()
    for s in range(first, last):
        ids = batch_ids(s)
        opt.zero_grad()
        loss_fn(model, (x[ids], y[ids])).mean().backward()
        rec.set_ids(ids)
        opt.step()


@pytest.mark.parametrize("every", [1, 3])
def test_resumed_recording_equals_an_uninterrupted_one(tmp_path, every):
    model = make_model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    with TrajectoryRecorder(tmp_path / "one", every=every, chunk_steps=2).attach(model, opt) as rec:
        steps(model, opt, rec, 0, 7)

    model = make_model()
    opt = OPTIMIZERS["adamw"](model.parameters())
    with TrajectoryRecorder(tmp_path / "two", every=every, chunk_steps=2).attach(model, opt) as rec:
        steps(model, opt, rec, 0, 4)  # "crash" after a flush at step 4
    with TrajectoryRecorder(tmp_path / "two", every=every, chunk_steps=2, resume=True).attach(model, opt) as rec:
        steps(model, opt, rec, 4, 7)

    a, b = Recording.load(tmp_path / "one"), Recording.load(tmp_path / "two")
    assert b.steps.tolist() == list(range(1, 8)) and b.missing_steps() == []
    assert b.manifest["run_id"] != a.manifest["run_id"] and b.checkpoint_steps == a.checkpoint_steps
    for s in range(1, 8):
        assert np.array_equal(a.ids(s), b.ids(s))
        if every == 1:
            assert torch.equal(a.state(s).theta, b.state(s).theta)
    assert torch.equal(a.final_theta(), b.final_theta())
    assert np.array_equal(run_adjoint(model, tmp_path / "one"), run_adjoint(model, tmp_path / "two"))


def test_resume_without_a_recording_starts_one(tmp_path):
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    with TrajectoryRecorder(tmp_path / "new", resume=True).attach(model, opt) as rec:
        steps(model, opt, rec, 0, 2)
    assert Recording.load(tmp_path / "new").steps.tolist() == [1, 2]


@pytest.fixture
def recorded(tmp_path):
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    with TrajectoryRecorder(tmp_path / "r").attach(model, opt) as rec:
        steps(model, opt, rec, 0, 3)
    return tmp_path / "r", model, opt


def test_existing_folder_needs_resume_or_overwrite(tmp_path, recorded):
    path, _, _ = recorded
    with pytest.raises(ConfigurationError, match=r"already holds a recording: pass resume=True .* overwrite=True"):
        TrajectoryRecorder(path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ConfigurationError, match=r"is not empty: pass resume=True .* overwrite=True"):
        TrajectoryRecorder(other)
    with pytest.raises(ConfigurationError, match="not both"):
        TrajectoryRecorder(path, resume=True, overwrite=True)


def test_overwrite_starts_a_new_recording(recorded):
    path, model, opt = recorded
    with TrajectoryRecorder(path, overwrite=True).attach(model, opt) as rec:
        steps(model, opt, rec, 3, 4)
    assert Recording.load(path).steps.tolist() == [1]


def _refused(path, model, opt, message, **kw):
    rec = TrajectoryRecorder(path, resume=True, **kw).attach(model, opt)
    x, y, _ = data()
    loss_fn(model, (x[:4], y[:4])).mean().backward()
    rec.set_ids(torch.arange(4))
    with pytest.raises(ConfigurationError, match=message):
        opt.step()
    rec.detach()


def test_resume_refuses_another_model(recorded):
    path, _, _ = recorded
    model = make_model(hidden=6)
    _refused(path, model, OPTIMIZERS["sgd_momentum"](model.parameters()), "not the recorded one.*parameters")


def test_resume_refuses_another_optimizer(recorded):
    path, model, _ = recorded
    _refused(path, model, OPTIMIZERS["adamw"](model.parameters()), "not the recorded one.*optimizer")


def test_resume_refuses_other_settings(recorded):
    path, _, _ = recorded
    with pytest.raises(ConfigurationError, match="other settings.*every"):
        TrajectoryRecorder(path, every=2, resume=True)


def test_resume_refuses_a_step_that_does_not_follow(recorded):
    """Through a tracker whose step counter was not restored: step 1 after a recording ending at 3."""
    path, model, opt = recorded
    x, y, xq = data()
    tracker = ShapleyTracker(model, opt, val_data=(xq, torch.zeros(3, 2, dtype=x.dtype)), val_loss_fn=loss_fn)
    tracker.add_step_listener(TrajectoryRecorder(path, resume=True))
    with pytest.raises(ConfigurationError, match="resumes at step 1 but the recording ends at step 3"):
        with tracker.batch(torch.arange(4)):
            loss_fn(model, (x[:4], y[:4])).mean().backward()
        opt.step()
    tracker.detach()
