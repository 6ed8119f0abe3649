"""transformers.Trainer with ShapleyTrainerCallback: the values equal a plain ShapleyTracker loop's
on the same rows in the same order (accumulation, clipping, bf16, per-token queries, resume,
two processes)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from inrun_shapley import ShapleyLog  # noqa: E402
from inrun_shapley.callbacks import ShapleyTrainerCallback  # noqa: E402
from inrun_shapley.callbacks.huggingface import causal_lm_loss  # noqa: E402
from inrun_shapley.errors import ConfigurationError, SampleIdError  # noqa: E402
from tests.callbacks.hf_setup import EXCLUDE, corpus_data, plain_values, train_with_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return corpus_data()


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.abs(a - b).max() <= rtol * np.abs(b).max()


def grad_norms(trainer) -> list[float]:
    return [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]


def test_trainer_equals_plain_tracker_with_accumulation_and_clipping(tmp_path, data):
    cb = ShapleyTrainerCallback(val_data=data[1], exclude=EXCLUDE, log_dir=tmp_path / "log")
    trainer = train_with_trainer(tmp_path / "out", cb, data, max_steps=4, gradient_accumulation_steps=2,
                                 max_grad_norm=0.5)
    assert max(grad_norms(trainer)) > 0.5  # clipping changed at least one step
    ref, counts = plain_values(data, steps=4, accumulate=2, clip=0.5)
    assert close(cb.values, ref) and np.array_equal(cb.counts, counts)
    assert close(ShapleyLog.load(tmp_path / "log").values, ref)


def test_unaccounted_clipping_would_differ(data):
    """The equality above can fail: the same run without clipping gives other values."""
    ref, _ = plain_values(data, steps=4, accumulate=2, clip=0.5)
    unclipped, _ = plain_values(data, steps=4, accumulate=2, clip=None)
    assert not close(unclipped, ref, rtol=1e-3)


def test_per_token_queries(tmp_path, data):
    per_token = functools.partial(causal_lm_loss, per_token=True)
    cb = ShapleyTrainerCallback(val_data=data[1], val_loss_fn=per_token, per_query=True, exclude=EXCLUDE)
    train_with_trainer(tmp_path / "out", cb, data, max_steps=3)
    ref, _ = plain_values(data, steps=3, val_loss_fn=per_token, per_query=True)
    assert cb.values.shape == (12, data[1]["input_ids"].numel() - len(data[1]["input_ids"]))
    assert close(cb.values, ref)


@pytest.mark.parametrize("bf16", [False, True])
def test_llama_fp32_and_bf16_on_cpu(tmp_path, data, bf16):
    """Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention) through the Trainer
    equals the plain tracker loop, in fp32 and under bf16 autocast."""
    cb = ShapleyTrainerCallback(val_data=data[1])
    train_with_trainer(tmp_path / "out", cb, data, max_steps=3, bf16=bf16, arch="llama")
    ref, _ = plain_values(data, steps=3, bf16=bf16, arch="llama")
    assert close(cb.values, ref)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, data):
    log = tmp_path / "log"
    first = ShapleyTrainerCallback(val_data=data[1], exclude=EXCLUDE, log_dir=log)
    train_with_trainer(tmp_path / "out", first, data, max_steps=3, save_strategy="steps", save_steps=2,
                       gradient_accumulation_steps=2)
    assert (tmp_path / "out" / "checkpoint-2" / "inrun_shapley" / "rank0.pt").exists()
    second = ShapleyTrainerCallback(val_data=data[1], exclude=EXCLUDE, log_dir=log)
    train_with_trainer(tmp_path / "out", second, data, max_steps=5, gradient_accumulation_steps=2,
                       resume=str(tmp_path / "out" / "checkpoint-2"))
    ref, counts = plain_values(data, steps=5, accumulate=2)
    assert close(second.values, ref) and np.array_equal(second.counts, counts)
    saved = ShapleyLog.load(log)
    assert close(saved.values, ref) and saved.last_step == 5


def test_resume_without_a_cursor_says_where_it_looked(tmp_path, data):
    from transformers import TrainerCallback

    train_with_trainer(tmp_path / "out", TrainerCallback(), data, max_steps=2, save_strategy="steps", save_steps=2)
    cb = ShapleyTrainerCallback(val_data=data[1], exclude=EXCLUDE)
    with pytest.raises(ConfigurationError, match="checkpoint-2"):
        train_with_trainer(tmp_path / "out", cb, data, max_steps=3, resume=True)


def test_a_dataset_without_ids_is_named(tmp_path, data):
    from transformers import Trainer

    from tests.callbacks.hf_setup import Rows, make_model, training_args

    train, val, vocab, length = data
    cb = ShapleyTrainerCallback(val_data=val, exclude=EXCLUDE)
    trainer = Trainer(model=make_model(vocab, length), args=training_args(tmp_path, max_steps=1),
                      train_dataset=Rows(train), callbacks=[cb])
    with pytest.raises(SampleIdError, match="IndexedDataset"):
        trainer.train()


def test_unknown_option_is_refused(data):
    with pytest.raises(ConfigurationError, match="estimater"):
        ShapleyTrainerCallback(val_data=data[1], estimater="loo")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path, data):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RESULT_PATH": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "callbacks" / "hf_ddp_script.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ref, counts = plain_values(data, steps=3, accumulate=2, clip=0.5)
    assert close(result["values"], ref) and np.array_equal(result["counts"], counts)
    assert max(result["grad_norms"]) > 0.5
    assert close(ShapleyLog.load(tmp_path / "log").values, ref)
