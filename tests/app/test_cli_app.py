"""The console script's contract: version, fast help, flag-named errors, CSV and per-query report."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import inrun_shapley
from inrun_shapley.app import cli
from inrun_shapley.app.cli import main
from inrun_shapley.errors import ConfigurationError, NonFiniteError, SampleIdError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter


@pytest.fixture
def tiny_log(tmp_path):
    """30 samples over 12 steps, one value per sample."""
    rng = np.random.default_rng(0)
    path = tmp_path / "run.shapley"
    with ShapleyLogWriter(path) as w:
        for step in range(1, 13):
            ids = rng.choice(30, size=8, replace=False)
            w.add_step(step, ids, rng.normal(size=8) + np.where(ids < 5, -1.0, 0.3))
    return path


@pytest.fixture
def query_log(tmp_path):
    """12 samples, 3 queries; query 1 ranks sample 7 first by a wide margin."""
    rng = np.random.default_rng(1)
    path = tmp_path / "q.shapley"
    with ShapleyLogWriter(path, n_queries=3) as w:
        for step in range(1, 7):
            ids = np.arange(12)
            vals = rng.normal(size=(12, 3))
            vals[7, 1] += 10.0
            w.add_step(step, ids, vals)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_version_is_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"inrun-shapley {inrun_shapley.__version__}"


def test_demo_help_prints_a_single_percent_sign(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "20% flipped" in out and "%%" not in out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "20% flipped" in out and "%%" not in out


@pytest.mark.slow
def test_help_imports_no_heavy_module():
    """``--help`` of every command loads neither the post-hoc tools, Lightning, plotting nor the demo.

    (tqdm is not in the list: ``import torch`` brings it in through ``torch.hub``.)
    """
    heavy = ("inrun_shapley.posthoc", "inrun_shapley.app.demo", "inrun_shapley.app.plots",
             "inrun_shapley.app.digits", "inrun_shapley.callbacks", "lightning", "matplotlib", "sklearn",
             "pandas")
    script = (
        "import sys, contextlib, io\n"
        "from inrun_shapley.app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(a) for a in (['--help'], ['report', '--help'], ['prune', '--help'], ['demo', '--help'])]\n"
        f"heavy = sorted(m for m in sys.modules if m.startswith({heavy!r}))\n"
        "print(codes, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 0, 0, 0] []", out.stdout


@pytest.mark.parametrize(
    "exc, expected",
    [
        (SampleIdError("ids must be a count >= 0 or an array of ids, got -3"), "--n-ids must be a count >= 0"),
        (ConfigurationError("keep_top must be an int >= 0, got -1"), "--keep-top must be an int >= 0"),
        (ConfigurationError("class_balanced=True needs labels (indexed by id)"), "--class-balanced needs labels"),
        (ConfigurationError("this log has a single value per sample; query=3 is invalid"), "; --query 3 is invalid"),
        (ConfigurationError("labels has 3 entries but ids up to 9 are scored"), "--labels has 3 entries"),
    ],
)
def test_library_keywords_become_flags(exc, expected):
    line = cli._one_line(exc)
    assert expected in line and not re.search(r"\w=", line), line


@pytest.mark.parametrize(
    "argv, match",
    [
        (["prune", "{log}", "--fraction", "0.2", "--n-ids", "-1", "--out", "{out}"], "--n-ids must be >= 0"),
        (["prune", "{log}", "--keep-top", "-2", "--out", "{out}"], "--keep-top must be >= 0"),
        (["prune", "{log}", "--fraction", "0.2", "--keep-top", "3", "--out", "{out}"], "not allowed with"),
        (["prune", "{log}", "--fraction", "0.2", "--class-balanced", "--labels", "{short}", "--out", "{out}"],
         "--labels has 3 entries"),
        (["report", "{log}", "--query", "0"], "--query needs a per-query log"),
        (["report", "{log}", "--highlight", "{tmp}/missing.txt"], "--highlight .*no such file"),
    ],
)
def test_errors_name_flags(tiny_log, tmp_path, capsys, argv, match):
    import re

    np.save(tmp_path / "short.npy", np.zeros(3, dtype=np.int64))
    names = {"log": tiny_log, "out": tmp_path / "keep.txt", "short": tmp_path / "short.npy", "tmp": tmp_path}
    assert main([a.format(**names) for a in argv]) == 2
    line = _error_line(capsys)
    assert re.search(match, line), line
    assert "ids=" not in line and "keep_top" not in line


def test_corrupt_log_data_is_one_error_line(tiny_log, capsys):
    for f in tiny_log.iterdir():
        if f.is_file() and f.name != "meta.json":
            f.write_bytes(b"\x00garbage")
    assert main(["report", str(tiny_log)]) == 2
    _error_line(capsys)


@pytest.mark.parametrize("exc", [NonFiniteError("loss became NaN at step 3"), RuntimeError("boom")])
def test_any_error_is_one_line_and_exit_2(tiny_log, capsys, monkeypatch, exc):
    def broken(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "report", cli.COMMANDS["report"]._replace(run=broken))
    assert main(["report", str(tiny_log)]) == 2
    line = _error_line(capsys)
    assert str(exc) in line


def test_report_states_its_ranking(tiny_log, capsys):
    assert main(["report", str(tiny_log)]) == 0
    out = capsys.readouterr().out
    assert "ranked by" in out and "per-step standardized score (step_std)" in out
    assert main(["report", str(tiny_log), "--normalize", "none"]) == 0
    assert "raw value sum (none)" in capsys.readouterr().out


def test_report_csv_is_the_per_sample_table(tiny_log, tmp_path, capsys):
    path = tmp_path / "sub" / "values.csv"
    assert main(["report", str(tiny_log), "--csv", str(path), "--top", "0"]) == 0
    assert str(path) in capsys.readouterr().out
    lines = path.read_text().splitlines()
    assert lines[0] == "id,score,raw_value,count"
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    log = ShapleyLog.load(tiny_log)
    ids = log.ids
    np.testing.assert_array_equal(table[:, 0].astype(np.int64), ids)
    np.testing.assert_allclose(table[:, 1], log.scores("step_std", query="mean")[ids], rtol=1e-9)
    np.testing.assert_allclose(table[:, 2], log.scores("none", query="mean")[ids], rtol=1e-9)
    np.testing.assert_array_equal(table[:, 3].astype(np.int64), log.counts[ids])


def test_report_one_query(query_log, tmp_path, capsys):
    csv = tmp_path / "q1.csv"
    assert main(["report", str(query_log), "--query", "1", "--top", "1", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "3 (query 1 below)" in out and "query 1" in out.split("ranked by")[1].splitlines()[0]
    most = out.split("most valuable")[1].splitlines()[2].split()
    assert most[0] == "7"
    log = ShapleyLog.load(query_log)
    np.testing.assert_allclose(np.loadtxt(csv, delimiter=",", skiprows=1)[:, 1],
                               log.scores("step_std", query=1)[log.ids], rtol=1e-9)
    assert main(["report", str(query_log), "--query", "3"]) == 2
    assert "--query must be in [0, 3)" in _error_line(capsys)
    assert main(["report", str(query_log)]) == 0
    assert "3 (averaged below)" in capsys.readouterr().out

