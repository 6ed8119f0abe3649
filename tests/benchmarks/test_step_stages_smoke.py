"""Smoke tests of ``benchmarks.step_stages`` (each stage of the tracker's step beside the floor)
and ``benchmarks.gpu_check`` (skips cleanly without CUDA)."""

from __future__ import annotations

import re

import torch

from benchmarks import gpu_check, step_stages


def test_step_stages_quick_prints_every_stage_and_they_add_up(capsys):
    assert step_stages.main(["--quick", "--models", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "command: python -m benchmarks.step_stages --quick --models mlp" in out
    head = re.search(r"step ([\d.]+) ms, plain ([\d.]+) ms, floor ([\d.]+) ms", out)
    tracker, plain, floor = (float(x) for x in head.groups())
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\w[\w/ ,()]*?)\s{2,}(-?[\d.]+)\s+(-?[\d.]+|-)\s+(-?[\d.]+)", line)
        if m:
            rows[m.group(1).split(" (")[0]] = float(m.group(2))
    for stage in ("midpoint", "validation", "directions", "score", "grad_norm", "check", "to_host",
                  "forward/backward, capture"):
        assert stage in rows, (stage, out)
    total = re.search(r"total above the floor\s+(-?[\d.]+)", out)
    assert abs(float(total.group(1)) - (tracker - floor)) < 0.02, out
    assert tracker > 0 and floor > plain > 0 and rows["midpoint"] > 0


def test_gpu_check_skips_cleanly_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        return  # the checks themselves run on the GPU
    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu").exists()
