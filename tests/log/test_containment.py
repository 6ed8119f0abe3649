"""A value log keeps its files inside its own directory: links and escapes are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from inrun_shapley.errors import LogError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter

from tests.log.helpers import make_steps, write


@pytest.fixture
def log_dir(tmp_path):
    path = tmp_path / "log"
    write(path, make_steps(n_steps=4), flush_every=2)
    return path


def _replace_with_link(path, name, tmp_path):
    """Move ``name`` out of the log and leave a symlink to it (same bytes, so CRCs still match)."""
    outside = tmp_path / f"outside-{name}"
    shutil.move(path / name, outside)
    (path / name).symlink_to(outside)


@pytest.mark.parametrize("pattern", ["totals-*.npz", "stats-000001.npy", "steps-000002.npy"])
def test_symlinked_data_file_refused(tmp_path, log_dir, pattern):
    name = next(log_dir.glob(pattern)).name
    _replace_with_link(log_dir, name, tmp_path)
    with pytest.raises(LogError, match="symbolic link"):
        ShapleyLog.load(log_dir)
    with pytest.raises(LogError, match="symbolic link"):
        ShapleyLog.load(log_dir, verify=False)


def test_symlinked_header_refused(tmp_path, log_dir):
    _replace_with_link(log_dir, "meta.json", tmp_path)
    with pytest.raises(LogError, match="symbolic link"):
        ShapleyLog.load(log_dir)
    with pytest.raises(LogError, match="symbolic link"):
        ShapleyLogWriter(log_dir, resume=True)


def test_file_name_escaping_the_directory_refused(log_dir):
    header = json.loads((log_dir / "meta.json").read_text())
    header["chunks"][0]["stats"]["file"] = "../log/stats-000001.npy"
    (log_dir / "meta.json").write_text(json.dumps(header))
    with pytest.raises(LogError, match="data file name"):
        ShapleyLog.load(log_dir)


def test_symlinked_log_directory_is_fine(tmp_path, log_dir):
    (tmp_path / "alias").symlink_to(log_dir)
    assert ShapleyLog.load(tmp_path / "alias").last_step == 4
