"""``benchmarks.common``: one model zoo, one digits loader, shared flags; scripts run as modules."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.common import cli, data, models

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_benchmark_edits_sys_path():
    offenders = [p.name for p in (ROOT / "benchmarks").rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


def test_digits_loader_is_the_library_one():
    from inrun_shapley.app import digits

    assert data.load_digits_splits is digits.load_digits_splits and data.flip_labels is digits.flip_labels
    assert models.mlp is digits.mlp


def test_lds_harness_data_goes_through_the_shared_loader():
    from benchmarks import lds_harness

    x_tr, y_tr, x_q, y_q = lds_harness.load_data(3, 200, 30)
    (a, b), (c, d) = data.load_digits_splits((200, 30), 3, scale="standardize_f64")
    assert torch.equal(x_tr, a) and torch.equal(y_tr, b) and torch.equal(x_q, c) and torch.equal(y_q, d)
    assert torch.allclose(x_tr.mean(0), torch.zeros(64), atol=1e-5)


def test_transformer_lm_shapes_and_padding_row():
    torch.manual_seed(0)
    lm = models.TinyTransformerLM(vocab=20, max_len=9, d=16, heads=2, layers=1, padding_idx=0)
    assert torch.equal(lm.tok.weight[0], torch.zeros(16))
    seqs = torch.randint(1, 20, (3, 9))
    assert lm(seqs).shape == (3, 9, 20)
    losses = models.lm_losses(lm, seqs)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    names = {n for n, _ in lm.named_parameters()}
    assert {"blocks.0.q.weight", "blocks.0.o.bias", "blocks.0.fc1.weight", "ln_f.weight"} <= names


def test_transformer_lm_is_causal():
    torch.manual_seed(0)
    lm = models.TinyTransformerLM(vocab=20, max_len=6, d=8, heads=2, layers=2).eval()
    a = torch.randint(0, 20, (1, 6))
    b = a.clone()
    b[0, 4:] = (b[0, 4:] + 1) % 20
    torch.testing.assert_close(lm(a)[:, :4], lm(b)[:, :4])


def test_shared_flags():
    p = argparse.ArgumentParser()
    cli.add_quick(p)
    cli.add_seeds(p, [0, 1])
    cli.add_threads(p)
    cli.add_out(p, help="where")
    args = p.parse_args(["--quick", "--seeds", "3", "4", "--threads", "2", "--out", "x"])
    assert (args.quick, args.seeds, args.threads, args.out) == (True, [3, 4], 2, "x")
    assert p.parse_args([]).seeds == [0, 1] and p.parse_args([]).threads == 1
    assert cli.command_line("overhead", ["--quick"]) == "python -m benchmarks.overhead --quick"


def test_set_threads_zero_keeps_torch_default():
    before = torch.get_num_threads()
    cli.set_threads(0)
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_benchmark_runs_as_a_module_from_the_root():
    out = subprocess.run([sys.executable, "-m", "benchmarks.lds_harness", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--threads" in out.stdout
