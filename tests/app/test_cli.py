"""End-to-end tests of the ``inrun-shapley`` console script and the plotting helpers."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from inrun_shapley.app import plots
from inrun_shapley.app.cli import COMMANDS, main
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_log(tmp_path):
    """40 samples over 20 steps; ids 0-7 are harmful (negative values), with 2 groups."""
    rng = np.random.default_rng(0)
    path = tmp_path / "run.shapley"
    with ShapleyLogWriter(path, group_names=["body", "head"], flush_every=7) as w:
        for step in range(1, 21):
            ids = rng.choice(40, size=10, replace=False)
            vals = rng.normal(size=10) / step + np.where(ids < 8, -0.5, 0.2) / step
            g = np.stack([0.7 * vals, 0.3 * vals], axis=1)
            w.add_step(step, ids, vals, g)
    return path


@pytest.fixture
def query_log(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "q.shapley"
    with ShapleyLogWriter(path, n_queries=3) as w:
        for step in range(1, 6):
            w.add_step(step, rng.choice(12, size=4, replace=False), rng.normal(size=(4, 3)))
    return path


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


def test_commands_table():
    assert {"prune", "report"} <= set(COMMANDS)
    for cmd in COMMANDS.values():
        assert callable(cmd.add_arguments) and callable(cmd.run) and cmd.help


@pytest.mark.parametrize("suffix", [".txt", ".npy"])
def test_prune_writes_kept_ids(tiny_log, tmp_path, capsys, suffix):
    out = tmp_path / f"keep{suffix}"
    rc = main(["prune", str(tiny_log), "--fraction", "0.25", "--out", str(out), "--n-ids", "45"])
    assert rc == 0
    kept = np.load(out) if suffix == ".npy" else np.loadtxt(out, dtype=np.int64)
    expected = prune(ShapleyLog.load(tiny_log), fraction=0.25, ids=45)
    np.testing.assert_array_equal(kept, expected)
    assert 40 <= expected.max() <= 44  # never-seen ids above the log's max are kept
    assert f"kept {expected.size} of 45 ids" in capsys.readouterr().out


def test_prune_options(tiny_log, tmp_path):
    out = tmp_path / "keep.txt"
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(40) % 2)
    rc = main(
        [
            "prune",
            str(tiny_log),
            "--fraction",
            "0.5",
            "--class-balanced",
            "--labels",
            str(labels),
            "--normalize",
            "none",
            "--drop-negative",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    expected = prune(
        ShapleyLog.load(tiny_log),
        fraction=0.5,
        class_balanced=True,
        labels=np.arange(40) % 2,
        normalize="none",
        drop_negative=True,
    )
    np.testing.assert_array_equal(np.loadtxt(out, dtype=np.int64, ndmin=1), expected)


def test_report_prints_and_plots(tiny_log, tmp_path, capsys):
    flipped = tmp_path / "flipped.txt"
    flipped.write_text("\n".join(str(i) for i in range(8)) + "\n")
    out = tmp_path / "report"
    rc = main(
        ["report", str(tiny_log), "--out", str(out), "--top", "3", "--highlight", str(flipped)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for needle in (
        "samples seen",
        "steps",
        "value (raw)",
        "value (step_std)",
        "group body",
        "group head",
        "most valuable",
        "least valuable",
        "AUC",
    ):
        assert needle in text, needle
    log = ShapleyLog.load(tiny_log)
    worst = log.ids[np.argmin(log.std_values[log.ids])]
    assert f" {worst} " in text.split("least valuable")[1]
    for name in (
        "value_histogram.png",
        "cumulative_value.png",
        "step_values.png",
        "top_bottom.png",
    ):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, name


def test_report_per_query_without_out(query_log, capsys):
    assert main(["report", str(query_log)]) == 0
    text = capsys.readouterr().out
    assert "3 (averaged below)" in text and "most valuable" in text


def test_report_merges_rank_directory(tmp_path, capsys):
    for r in range(2):
        with ShapleyLogWriter(tmp_path / "run" / f"rank{r}") as w:
            w.add_step(1, np.array([2 * r, 2 * r + 1]), np.array([0.1, -0.2]))
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "4 (max id 3)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["prune", "{missing}", "--fraction", "0.2", "--out", "{out}"], "no such value log"),
        (["prune", "{corrupt}", "--fraction", "0.2", "--out", "{out}"], "unreadable header"),
        (["report", "{corrupt}"], "unreadable header"),
        (
            ["prune", "{log}", "--fraction", "1.5", "--out", "{out}"],
            r"fraction must be a number in \[0, 1\)",
        ),
        (["prune", "{log}", "--fraction", "1.0", "--out", "{out}"], r"--fraction 1 drops every scored sample.*--keep-top"),
        (["prune", "{log}", "--fraction", "-0.1", "--out", "{out}"], "fraction must be a number"),
        (["prune", "{log}", "--fraction", "abc", "--out", "{out}"], r"in \[0, 1\) or 'auto' .*got 'abc'"),
        (["prune", "{log}", "--fraction", "nan", "--out", "{out}"], r"--fraction must be a number in \[0, 1\) or 'auto'"),
        (["prune", "{log}", "--fraction", "0.2"], "the following arguments are required: --out"),
        (["prune", "{log}", "--out", "{out}"], "nothing to prune"),
        (
            ["prune", "{log}", "--fraction", "0.2", "--normalize", "z", "--out", "{out}"],
            "invalid choice",
        ),
        (
            ["prune", "{log}", "--fraction", "0.2", "--out", "{tmp}/no/such/dir/keep.txt"],
            "No such file",
        ),
        (
            ["prune", "{log}", "--fraction", "0.2", "--class-balanced", "--out", "{out}"],
            "--class-balanced needs --labels",
        ),
        (
            [
                "prune",
                "{log}",
                "--fraction",
                "0.2",
                "--labels",
                "{tmp}/nolabels.npy",
                "--out",
                "{out}",
            ],
            "no such file",
        ),
        (["report", "{log}", "--top", "-1"], "--top must be >= 0"),
        (["frobnicate"], "invalid choice"),
        ([], "a command is required"),
    ],
)
def test_cli_errors(tiny_log, tmp_path, capsys, argv, match):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{not json")
    names = {
        "missing": tmp_path / "missing",
        "corrupt": corrupt,
        "log": tiny_log,
        "out": tmp_path / "keep.txt",
        "tmp": tmp_path,
    }
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert re.search(match, line), line


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out


@pytest.mark.slow
def test_console_module_exit_code(tmp_path):
    """``python -m inrun_shapley.app.cli`` propagates main's exit code (one subprocess: slow import)."""
    bad = subprocess.run(
        [sys.executable, "-m", "inrun_shapley.app.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# plotting helpers
# --------------------------------------------------------------------------------------------


def test_plot_helpers(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=100)
    flipped = np.arange(100) < 20
    paths = [
        plots.plot_value_histogram(scores, tmp_path / "h.png", groups=flipped),
        plots.plot_value_histogram(scores, tmp_path / "h2.png", groups=np.arange(100) % 3),
        plots.plot_value_histogram(scores, tmp_path / "sub" / "h3.png"),
        plots.plot_cumulative_value(scores, tmp_path / "c.png"),
        plots.plot_step_values(np.arange(1, 11), rng.normal(size=(10, 2)), tmp_path / "s.png"),
        plots.plot_top_bottom(np.arange(100), scores, tmp_path / "t.png", k=5),
        plots.plot_accuracy_vs_fraction(
            {
                "shapley": ([0.0, 0.1, 0.2], [0.90, 0.92, 0.93]),
                "random": ([0.0, 0.1, 0.2], [0.90, 0.89, 0.87], [0.01, 0.01, 0.02]),
            },
            tmp_path / "a.png",
        ),
        plots.plot_accuracy_vs_fraction(
            {
                "method": ["a", "a", "a", "a", "b", "b"],
                "fraction": [0, 0, 0.2, 0.2, 0, 0.2],
                "accuracy": [0.9, 0.91, 0.93, 0.92, 0.9, 0.88],
            },
            tmp_path / "a2.png",
        ),
    ]
    for p in paths:
        assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC


def test_plot_accuracy_from_dataframe(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {"method": ["x", "x"], "fraction": [0.0, 0.5], "accuracy": [0.8, 0.85], "std": [0.01, 0.02]}
    )
    assert plots.plot_accuracy_vs_fraction(df, tmp_path / "df.png").is_file()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: plots.plot_accuracy_vs_fraction({}, p), "non-empty"),
        (lambda p: plots.plot_accuracy_vs_fraction({"a": [1, 2, 3, 4]}, p), "method -> "),
        (lambda p: plots.plot_accuracy_vs_fraction({"a": ([0, 1], [0.5])}, p), "differ in length"),
        (
            lambda p: plots.plot_value_histogram(np.zeros(3), p, groups=np.zeros(2, bool)),
            "groups has shape",
        ),
        (lambda p: plots.plot_step_values([1, 2], [0.1], p), "differ"),
    ],
)
def test_plot_bad_inputs(tmp_path, call, match):
    from inrun_shapley.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=match):
        call(tmp_path / "x.png")
