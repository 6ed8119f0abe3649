"""Smoke test of ``benchmarks/overhead.py --quick``: it runs end to end and prints its table."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def _load():
    spec = importlib.util.spec_from_file_location("overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overhead_quick_prints_table(capsys):
    bench = _load()
    start = time.perf_counter()
    assert bench.main(["--quick"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "command: python benchmarks/overhead.py --quick" in out
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
    bench = _load()
    assert bench.main(["--quick", "--device", "cuda"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
