"""The README's code blocks run exactly as written (blocks marked ``<!-- readme-test: NAME -->``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = dict(re.findall(r"<!-- readme-test: (\w+) -->\s*```python\n(.*?)```", README.read_text(), re.S))


# The user's own objects that the Lightning/Accelerate snippets assume (train_set, val_set, a
# LightningModule reading dict batches, a model, its optimizer and loss).
PREAMBLE = """
import torch, torch.nn.functional as F
import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
train_set, val_set = TensorDataset(x[:64], y[:64]), (x[64:], y[64:])

class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

module = Module()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = F.cross_entropy
"""

# The Hugging Face snippet's own objects: a tiny causal LM built from a config (no download), its
# training rows as dict items and one validation batch.
HUGGINGFACE_PREAMBLE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=50, max_position_embeddings=8))
tokens = torch.randint(0, 50, (48, 8))
train_rows = [{"input_ids": t, "labels": t} for t in tokens[:32]]
val_batch = {"input_ids": tokens[32:], "labels": tokens[32:]}
"""


def test_readme_has_its_examples():
    assert {"plain", "lightning", "accelerate", "adjoint"} <= set(BLOCKS)
    # every python block of the README is marked, so every one runs below
    assert len(re.findall(r"```python\n", README.read_text())) == len(BLOCKS)


def _run(name: str) -> None:
    namespace: dict = {"__name__": "__readme__"}
    if name == "huggingface":
        pytest.importorskip("transformers")
        exec(HUGGINGFACE_PREAMBLE, namespace)
    elif name == "adjoint":  # its snippet continues the plain one (same model, tracker, data)
        exec(compile(BLOCKS["plain"], "README:plain", "exec"), namespace)
    elif name != "plain":
        exec(PREAMBLE, namespace)
    if name == "accelerate":  # its snippet follows the Lightning one in the README
        exec("from torch.utils.data import DataLoader\nfrom inrun_shapley import IndexedDataset", namespace)
    exec(compile(BLOCKS[name], f"README:{name}", "exec"), namespace)
    tracker = namespace.get("tracker")
    if tracker is not None:
        tracker.close()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_example_runs_twice(name, tmp_path, monkeypatch):
    """As written, twice in a row in the same folder (a rerun of the user's script)."""
    if name == "curation":
        pytest.importorskip("datasets")
    if name == "sharded":
        pytest.skip("runs under torchrun with 2 processes: tests/distributed/test_fsdp.py")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        _run(name)
    if name == "lightning":
        assert (tmp_path / "shapley_log" / "meta.json").exists()
    if name == "huggingface":
        assert (tmp_path / "hf_shapley_log" / "meta.json").exists()


def test_every_import_the_readme_names_works():
    """Code and prose alike (``from inrun_shapley import causal_lm_loss`` is named in a sentence)."""
    import importlib

    pytest.importorskip("transformers")
    found = re.findall(r"from (inrun_shapley[.\w]*) import ([\w, ]+)", README.read_text())
    assert ("inrun_shapley", "causal_lm_loss") in found
    for module, names in found:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert getattr(mod, name.strip(), None) is not None, f"from {module} import {name.strip()}"
