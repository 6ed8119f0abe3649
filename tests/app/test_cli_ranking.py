"""One ranking everywhere: ``ShapleyLog.top``, ``report`` and ``prune`` rank by the per-step
standardized score times the log's ``helpful_sign``, say so, and work on sparse ids."""

from __future__ import annotations

import re

import numpy as np
import pytest

from inrun_shapley.app.cli import main
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune

ADJOINT = dict(score_kind="adjoint", positive_means="including the sample raises the query loss", helpful_sign=-1)
BIG = 2**40  # ids offset by this are far too sparse for a dense array


def _write(path, steps, **kw):
    with ShapleyLogWriter(path, **kw) as w:
        for step, ids, vals in steps:
            w.add_step(step, np.asarray(ids), np.asarray(vals, dtype=np.float64))
    return path


def _scale_skewed_steps(offset=0):
    """12 samples over 8 steps whose raw sums and step-standardized sums rank differently: step 1
    has a spread 100x larger than the others and favours ids 0-3; later steps favour ids 8-11."""
    rng = np.random.default_rng(3)
    ids = np.arange(12) + offset
    steps = [(1, ids, np.r_[np.full(4, 1.0), np.full(4, 0.0), np.full(4, -1.0)] + rng.normal(0, 0.01, 12))]
    for s in range(2, 9):
        steps.append((s, ids, 0.01 * np.r_[np.full(4, -1.0), np.full(4, 0.0), np.full(4, 1.0)] + rng.normal(0, 1e-3, 12)))
    return steps


def _report_table(out: str, title: str) -> list[int]:
    """The ids of a report table (``most valuable`` or ``least valuable``), in printed order."""
    block = out.split(f"\n{title} (ranked by ")[1].splitlines()[2:]
    rows = []
    for line in block:
        if not line.strip():
            break
        rows.append(int(line.split()[0]))
    return rows


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.mark.parametrize("kind", ["inrun", "adjoint"])
def test_top_report_and_prune_agree_by_default(tmp_path, capsys, kind):
    steps = _scale_skewed_steps()
    if kind == "adjoint":  # the same information as a harmful-high score
        steps = [(s, i, -v) for s, i, v in steps]
    path = _write(tmp_path / "log", steps, **(ADJOINT if kind == "adjoint" else {}))
    log = ShapleyLog.load(path)

    best = log.top(k=4)
    worst = log.top(k=4, largest=False)
    assert sorted(best.ids.tolist()) == [8, 9, 10, 11]
    assert sorted(worst.ids.tolist()) == [0, 1, 2, 3]  # raw sums would rank these first
    assert "per-step standardized score (step_std)" in best.ranking
    assert best.ranking.endswith("times helpful_sign " + ("-1" if kind == "adjoint" else "+1"))
    ids, scores = best  # still unpacks as a pair
    np.testing.assert_array_equal(scores, log.scores("step_std", ids=ids))

    assert main(["report", str(path), "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert _report_table(out, "most valuable") == best.ids.tolist()
    assert _report_table(out, "least valuable")[::-1] == worst.ids.tolist()
    assert re.search(rf"^ranked by +{re.escape(best.ranking)} \(higher = more helpful\)$", out, re.M)

    keep_file = tmp_path / "keep.txt"
    assert main(["prune", str(path), "--fraction", str(4 / 12), "--out", str(keep_file)]) == 0
    dropped = np.setdiff1d(np.arange(12), np.loadtxt(keep_file, dtype=np.int64))
    assert dropped.tolist() == sorted(worst.ids.tolist())
    assert np.array_equal(np.setdiff1d(np.arange(12), prune(log, fraction=4 / 12)), dropped)
    assert f"ranked by {best.ranking}" in capsys.readouterr().out


def test_top_raw_ranking_is_still_available_and_named(tmp_path):
    log = ShapleyLog.load(_write(tmp_path / "log", _scale_skewed_steps()))
    raw = log.top(k=4, normalize="none")
    assert sorted(raw.ids.tolist()) == [0, 1, 2, 3] and raw.ranking.startswith("raw value sum (none)")


def test_report_and_prune_on_sparse_ids(tmp_path, capsys):
    path = _write(tmp_path / "log", _scale_skewed_steps(offset=BIG))
    log = ShapleyLog.load(path)
    csv = tmp_path / "v.csv"
    assert main(["report", str(path), "--top", "3", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert _report_table(out, "most valuable") == log.top(k=3).ids.tolist()
    assert min(_report_table(out, "most valuable")) >= BIG
    table = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert table.shape == (12, 4) and table[:, 3].tolist() == [8] * 12

    keep_file = tmp_path / "keep.txt"
    assert main(["prune", str(path), "--fraction", "0.25", "--out", str(keep_file)]) == 2
    assert "--unseen drop" in _error_line(capsys)
    assert main(["prune", str(path), "--fraction", "0.25", "--unseen", "drop", "--out", str(keep_file)]) == 0
    kept = np.loadtxt(keep_file, dtype=np.int64)
    assert kept.tolist() == prune(log, fraction=0.25, unseen="drop").tolist()
    assert kept.size == 9 and kept.min() >= BIG
    assert "kept 9 of 12 ids (3 dropped)" in capsys.readouterr().out


def test_adjoint_log_ranks_helpful_first_in_report(tmp_path, capsys):
    # id 5 lowers the query loss most (most negative adjoint score): the most helpful
    vals = np.array([0.2, 0.1, 0.3, -0.1, 0.0, -0.9])
    path = _write(tmp_path / "adj", [(1, np.arange(6), vals)], **ADJOINT)
    assert main(["report", str(path), "--top", "2", "--normalize", "none"]) == 0
    out = capsys.readouterr().out
    assert _report_table(out, "most valuable") == [5, 3]
    assert _report_table(out, "least valuable") == [0, 2]
    assert "helpful_sign -1" in out and "adjoint: positive = including the sample raises the query loss" in out
    # the helpfulness column is the score times -1
    first = out.split("\nmost valuable (ranked by ")[1].splitlines()[2].split()
    assert float(first[1]) == pytest.approx(0.9) and float(first[2]) == pytest.approx(-0.9)


def test_unknown_sign_is_refused_in_one_line(tmp_path, capsys):
    path = _write(tmp_path / "unk", [(1, np.arange(3), [0.1, 0.2, 0.3])], score_kind="adjoint",
                  positive_means="raises f_q", helpful_sign=None)
    assert main(["report", str(path)]) == 2
    line = _error_line(capsys)
    assert "report needs to know whether a higher score is more helpful" in line and "helpful_sign null" in line
    assert main(["prune", str(path), "--fraction", "0.5", "--out", str(tmp_path / "k.txt")]) == 2
    assert "helpful_sign null" in _error_line(capsys)


def test_prune_cli_warns_about_skewed_classes(tmp_path, capsys):
    ids = np.arange(30)
    vals = np.concatenate([np.linspace(-1.0, -0.1, 10), np.linspace(0.1, 1.0, 10), np.linspace(0.2, 1.1, 10)])
    path = _write(tmp_path / "log", [(1, ids, vals)])
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{c}\n" for c in np.repeat([0, 1, 2], 10)))
    out = tmp_path / "keep.txt"
    assert main(["prune", str(path), "--fraction", "0.3", "--labels", str(labels), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: pruning drops 9 of 30")
    assert "class 0: 9 of 10" in err[0] and "pass --class-balanced" in err[0]
    assert main(["prune", str(path), "--fraction", "0.3", "--labels", str(labels), "--class-balanced",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
