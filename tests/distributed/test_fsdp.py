"""FSDP2 (``fully_shard``): 2 processes give the values of one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inrun_shapley.log import ShapleyLog
from tests.callbacks.integration_setup import assert_equals_one_process, close
from tests.distributed.fsdp_setup import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def torchrun(script: str, args: list[str], tmp_path: Path, nproc: int = 2, fails: bool = False) -> Path:
    """Run ``tests/distributed/<script>`` under ``torchrun --nproc_per_node nproc`` (CPU, gloo);
    returns the results' path prefix (``$RESULT_PATH``). ``fails``: a rank is meant to die."""
    out = tmp_path / "result"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RESULT_PATH": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "distributed" / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (proc.returncode != 0) == fails, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def merged(prefix: Path, kind: str, world: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Values and counts of every rank summed (each rank holds its own samples only)."""
    parts = [np.load(f"{prefix}.{kind}.rank{r}.npy") for r in range(world)]
    n = max(p.shape[1] for p in parts)
    total = sum(np.pad(p, ((0, 0), (0, n - p.shape[1]))) for p in parts)
    return total[0], total[1]


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    prefix = torchrun("fsdp_plain.py", ["mlp", "lm"], tmp_path)
    for kind in ("mlp", "lm"):
        ref = train(kind)
        values, counts = merged(prefix, kind)
        assert np.array_equal(counts, ref.counts[: len(counts)]), kind
        scale = np.abs(ref.values).max()
        assert np.abs(values - ref.values[: len(values)]).max() <= 1e-4 * scale, kind
        assert scale > 0 and np.count_nonzero(values) == len(values), kind


def run_script(script: str, tmp_path: Path, *args: str) -> dict:
    """``tests/distributed/<script>`` under torchrun with 2 processes; its $RESULT_PATH json."""
    prefix = torchrun(script, list(args), tmp_path)
    return json.loads(prefix.read_text())


def test_lightning_fsdp2_strategy_equals_one_process(tmp_path):
    result = run_script("lightning_fsdp.py", tmp_path)
    assert_equals_one_process(result, tmp_path / "log")


def test_accelerate_fsdp2_plugin_equals_one_process(tmp_path):
    result = run_script("accelerate_fsdp.py", tmp_path)
    assert_equals_one_process(result, tmp_path / "log")


@pytest.mark.slow
def test_lightning_fsdp2_killed_rank_resumes_to_the_uninterrupted_values(tmp_path):
    torchrun("lightning_fsdp.py", ["crash"], tmp_path, fails=True)  # rank 1 dies at step 7
    assert json.loads((tmp_path / "log" / "rank1" / "meta.json").read_text())["last_step"] == 6
    result = run_script("lightning_fsdp.py", tmp_path, "resume")  # from the step-4 checkpoint
    # steps 5-6 were in the log already: not counted twice
    assert_equals_one_process(result, tmp_path / "log", last_step=8)


@pytest.mark.slow
def test_hf_trainer_fsdp2_equals_one_process(tmp_path):
    from tests.callbacks.hf_setup import corpus_data
    from tests.callbacks.hf_setup import plain_values as hf_plain_values

    result = run_script("hf_fsdp.py", tmp_path)
    ref, counts = hf_plain_values(corpus_data(), steps=3, clip=0.5, arch="llama")
    assert close(result["values"], ref) and np.array_equal(result["counts"], counts)
    assert close(ShapleyLog.load(tmp_path / "log").values, ref)


@pytest.mark.slow
def test_readme_sharded_block_two_processes_equal_one(tmp_path):
    values = {}
    for nproc in (1, 2):
        folder = tmp_path / f"n{nproc}"
        folder.mkdir()
        values[nproc] = np.load(f"{torchrun('readme_sharded.py', [], folder, nproc=nproc)}.npy")
    assert np.count_nonzero(values[1]) == len(values[1])
    assert np.abs(values[2] - values[1]).max() <= 1e-4 * np.abs(values[1]).max()


@pytest.mark.slow
def test_accelerate_killed_rank_resumes_each_rank_from_its_own_cursor(tmp_path):
    """Accelerate's main process alone writes the registered hook's state: it must carry every
    rank's cursor (DDP here: Accelerate's FSDP save_state is not reachable on CPU)."""
    torchrun("accelerate_fsdp.py", ["crash", "--ddp"], tmp_path, fails=True)
    result = run_script("accelerate_fsdp.py", tmp_path, "resume", "--ddp")
    assert_equals_one_process(result, tmp_path / "log", last_step=8)
