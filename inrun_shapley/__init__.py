"""inrun-shapley: which training samples helped or hurt your model, computed while it trains.

Quick start (plain PyTorch; Lightning and Accelerate users add ``ShapleyCallback`` or
``ShapleyHook`` from :mod:`inrun_shapley.callbacks` instead)::

    from inrun_shapley import ShapleyTracker

    tracker = ShapleyTracker(model, optimizer, val_data=(X_val, y_val))
    for ids in batches_of_row_numbers:
        with tracker.batch(ids):                 # forward + backward of these rows
            loss_fn(model(X[ids]), y[ids]).backward()
        optimizer.step(); optimizer.zero_grad()  # values are computed inside step()
    tracker.values                               # [n] run value per sample id

Sign and units: a value is positive when the sample lowered the validation loss; values include
the learning rate, so they are in units of validation loss. See ``docs/`` for the math.

The post-hoc tools (``bayesian_influence``, ``adjoint_influence``, ...) and the framework
adapters are imported on first use, so ``import inrun_shapley`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from inrun_shapley._version import __version__
from inrun_shapley.errors import (
    AttributionError,
    ConfigurationError,
    LogError,
    NonFiniteError,
    SampleIdError,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
)

# name -> module that defines it, imported on first attribute access (PEP 562): a bare
# ``import inrun_shapley`` (and so ``inrun-shapley --help``) loads neither torch nor the
# post-hoc stack.
_LAZY = {
    "IndexedDataset": "inrun_shapley.data",
    "ShapleyTracker": "inrun_shapley.engine",
    "ModuleReport": "inrun_shapley.engine",
    "ValidationObjective": "inrun_shapley.engine",
    "Estimator": "inrun_shapley.engine",
    "ShapleyLog": "inrun_shapley.log",
    "ShapleyLogWriter": "inrun_shapley.log",
    "prune": "inrun_shapley.pruning",
    "subset": "inrun_shapley.pruning",
    "document_values": "inrun_shapley.documents",
    "Recording": "inrun_shapley.trajectory",
    "TrajectoryRecorder": "inrun_shapley.trajectory",
    "adjoint_influence": "inrun_shapley.posthoc.adjoint",
    "BIFConfig": "inrun_shapley.posthoc.bif",
    "BIFResult": "inrun_shapley.posthoc.bif",
    "bayesian_influence": "inrun_shapley.posthoc.bif",
    "ShapleyCallback": "inrun_shapley.callbacks.lightning",
    "ShapleyHook": "inrun_shapley.callbacks.accelerate",
    "ShapleyTrainerCallback": "inrun_shapley.callbacks.huggingface",
    "causal_lm_loss": "inrun_shapley.callbacks.huggingface",
}

if TYPE_CHECKING:  # pragma: no cover
    from inrun_shapley.callbacks.accelerate import ShapleyHook
    from inrun_shapley.callbacks.lightning import ShapleyCallback
    from inrun_shapley.data import IndexedDataset
    from inrun_shapley.documents import document_values
    from inrun_shapley.engine import Estimator, ModuleReport, ShapleyTracker, ValidationObjective
    from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
    from inrun_shapley.posthoc.adjoint import adjoint_influence
    from inrun_shapley.posthoc.bif import BIFConfig, BIFResult, bayesian_influence
    from inrun_shapley.pruning import prune, subset
    from inrun_shapley.trajectory import Recording, TrajectoryRecorder


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'inrun_shapley' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AttributionError",
    "ConfigurationError",
    "LogError",
    "NonFiniteError",
    "SampleIdError",
    "UnsupportedModuleError",
    "UnsupportedOptimizerError",
    "__version__",
    *_LAZY,
]
