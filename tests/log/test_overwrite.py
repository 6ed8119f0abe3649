"""``ShapleyLogWriter(..., overwrite=True)``: an existing log is replaced whole, never mixed."""

from __future__ import annotations

import numpy as np
import pytest

from inrun_shapley.errors import ConfigurationError, LogError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter, commit
from inrun_shapley.log.format import listed_files
from tests.log.helpers import assert_totals_match, make_steps, write


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_overwrite_replaces_the_log_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=9, seed=0), flush_every=2)
    new_steps = make_steps(n_steps=3, n_ids=5, batch=3, seed=1)
    log = write(path, new_steps, overwrite=True)
    assert log.last_step == 3 and log.header["n_steps"] == 3 and "resumed" not in log.header
    assert_totals_match(log.totals(), new_steps)
    assert _siblings(path) == []  # the old log moved aside was deleted
    assert sorted(p.name for p in path.iterdir()) == sorted({"meta.json", *listed_files(log.header)})


def test_errors_name_both_options(tmp_path):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=2))
    with pytest.raises(LogError, match="resume=True to continue it, overwrite=True to replace it"):
        ShapleyLogWriter(path)
    with pytest.raises(ConfigurationError, match="resume=True .* or overwrite=True .*not both"):
        ShapleyLogWriter(path, resume=True, overwrite=True)
    assert ShapleyLog.load(path).last_step == 2  # refused arguments never touch the log


def test_overwrite_of_a_missing_or_foreign_directory(tmp_path):
    log = write(tmp_path / "new", make_steps(n_steps=2), overwrite=True)  # nothing to replace
    assert log.last_step == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LogError, match="holds no value log"):
        ShapleyLogWriter(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"  # only a value log is ever replaced


def test_a_crash_while_deleting_the_old_log_leaves_it_whole_aside(tmp_path, monkeypatch):
    path = tmp_path / "log"
    old_steps = make_steps(n_steps=6, seed=2)
    write(path, old_steps, flush_every=2)

    def killed(target, *a, **k):  # the process dies between the rename and the delete
        raise KeyboardInterrupt

    monkeypatch.setattr(commit.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ShapleyLogWriter(path, overwrite=True)
    (aside,) = [tmp_path / n for n in _siblings(path)]
    assert aside.name.startswith(".log.replaced-")
    assert_totals_match(ShapleyLog.load(aside).totals(), old_steps)  # the old log, complete
    with pytest.raises(LogError):  # and nothing half-written where it was
        ShapleyLog.load(path)


def test_failed_delete_warns_and_the_new_log_is_written(tmp_path, monkeypatch):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=4, seed=3))

    def refuse(target, *a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(commit.shutil, "rmtree", refuse)
    with pytest.warns(RuntimeWarning, match="replaced log could not be deleted and remains at .*read-only"):
        w = ShapleyLogWriter(path, overwrite=True)
    w.add_step(1, np.array([0]), np.array([0.5]))
    w.close()
    assert ShapleyLog.load(path).ids.tolist() == [0]
