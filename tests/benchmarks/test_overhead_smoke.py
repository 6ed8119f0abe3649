"""Smoke test of ``python -m benchmarks.overhead --quick``: it runs end to end and prints its table."""

from __future__ import annotations

import time

import pytest

from benchmarks import overhead as bench


@pytest.mark.slow
def test_overhead_quick_prints_table(capsys):
    start = time.perf_counter()
    assert bench.main(["--quick"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "command: python -m benchmarks.overhead --quick" in out
    for model in ("[mlp]", "[transformer]"):
        assert model in out
    for row in ("plain", "tracker val=2 (B/8)", "tracker val=16 (B)", "tracker, cached g_v (machinery)",
                "torch.func per-sample", "validation.gradient alone", "machinery, cpu: (cached g_v − plain) / plain",
                "machinery, cpu: (tracker B/8 − validation − plain) / plain", "total with val=B/8, cpu: tracker / plain",
                "total with val=B, cpu: tracker / plain", "peak memory (B/8) / plain"):
        assert row in out, row
    assert out.count("cpu ms") == 2 and out.count("wall ms") == 2 and out.count("dpeak MB") == 2
    # the tracker's values equal the materialized per-sample-gradient reference (fp64 check)
    diffs = [float(line.rsplit("max rel diff ", 1)[1]) for line in out.splitlines() if "max rel diff" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-9, diffs
    assert elapsed < 30, f"--quick took {elapsed:.1f} s"


def test_overhead_cuda_flag_skips_cleanly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        return  # the GPU path is exercised by running the benchmark itself
    assert bench.main(["--quick", "--device", "cuda"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
