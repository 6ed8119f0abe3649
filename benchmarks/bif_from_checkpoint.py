"""Attribute with the Bayesian Influence Function from a Lightning checkpoint.

Two ways to get w* out of a ``.ckpt`` file, then one call to
:func:`inrun_shapley.posthoc.bif.bayesian_influence`:

- :func:`bif_from_checkpoint`: rebuild the ``LightningModule`` with its own
  ``load_from_checkpoint`` (hyper-parameters saved with ``save_hyperparameters()``) and sample it.
- :func:`load_weights`: copy the checkpoint's ``state_dict`` into a plain ``nn.Module``, e.g. the
  network a LightningModule keeps as ``self.model`` (keys prefixed ``"model."``), without
  importing the LightningModule class.

Run this file for a self-contained demo (trains a tiny digits classifier for one epoch, saves a
checkpoint in a temporary folder, reloads it and prints the BIF summary)::

    python -m benchmarks.bif_from_checkpoint
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from inrun_shapley.posthoc.bif import BIFConfig, BIFResult, bayesian_influence


def bif_from_checkpoint(
    module_cls: Any,
    checkpoint_path: str | Path,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    train_loader: Any,
    train_samples: Any,
    queries: Any,
    config: Optional[BIFConfig] = None,
    observable_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    params: Any = None,
    map_location: str | torch.device = "cpu",
    progress: bool = True,
) -> BIFResult:
    """Load ``module_cls`` from ``checkpoint_path`` and return its BIF (see ``bayesian_influence``).

    Args:
        module_cls: the ``LightningModule`` subclass that wrote the checkpoint.
        checkpoint_path: path of the ``.ckpt`` file.
        loss_fn: ``loss_fn(module, batch) -> [B]`` per-sample losses (reduction="none").
        train_loader, train_samples, queries, config, observable_fn, params, progress: as in
            :func:`inrun_shapley.posthoc.bif.bayesian_influence`.
        map_location: device to load the weights onto.

    Returns:
        The :class:`~inrun_shapley.posthoc.bif.BIFResult` (``bif`` is ``[n_train, n_queries]``; positive =
        including the training sample raises the observable).
    """
    module = module_cls.load_from_checkpoint(str(checkpoint_path), map_location=map_location)
    return bayesian_influence(module, loss_fn, train_loader, train_samples, queries, config=config,
                              observable_fn=observable_fn, params=params, progress=progress)


def load_weights(model: nn.Module, checkpoint_path: str | Path, prefix: str = "") -> nn.Module:
    """Copy the weights of a Lightning checkpoint into ``model`` (strict) and return it.

    Args:
        model: a plain ``nn.Module`` with the checkpoint's architecture.
        checkpoint_path: path of the ``.ckpt`` file (a dict with a ``"state_dict"`` entry).
        prefix: key prefix to strip and select, e.g. ``"model."`` when the LightningModule held
            the network as ``self.model``; ``""`` takes every key as is.
    """
    checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


def _demo() -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.common.data import load_digits_splits
    from benchmarks.common.models import mlp

    torch.set_num_threads(1)

    class DigitsClassifier(L.LightningModule):
        def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = mlp((hidden,), activation="tanh")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return per_sample_loss(self, batch).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def per_sample_loss(module: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(module(x), y, reduction="none")

    [(x, y)] = load_digits_splits((None,), None, scale="unit")  # scikit-learn's order, intensities / 16
    train_set = TensorDataset(x[:1000], y[:1000])
    torch.manual_seed(0)
    module = DigitsClassifier()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(train_set, batch_size=64, shuffle=True))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "digits.ckpt"
        trainer.save_checkpoint(path)
        result = bif_from_checkpoint(
            DigitsClassifier, path, per_sample_loss,
            train_loader=DataLoader(train_set, batch_size=64, shuffle=True),
            train_samples=(x[:200], y[:200]), queries=(x[1000:1010], y[1000:1010]),
            config=BIFConfig(step_size=2e-4, n_beta=50.0, gamma=1e3, draws=200, burn_in=None, thin=1,
                             control_variate=None), progress=False,
        )
        plain = load_weights(mlp((32,), activation="tanh"), path, "model.")
        assert torch.equal(plain[0].weight, module.model[0].weight)
    print(result.summary())
    top = result.bif[:, 0].argsort()[:5].tolist()
    print(f"training samples that most lower query 0's loss (most negative BIF): {top}")


if __name__ == "__main__":
    _demo()
