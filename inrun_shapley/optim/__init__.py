"""Optimizer adapters: one pure unit per optimizer family, looked up by class (MRO)."""

from inrun_shapley.optim import adam, sgd  # noqa: F401  (registers adapters)
from inrun_shapley.optim.base import (
    OptimizerAdapter,
    StepTerms,
    adapter_for,
    innermost_optimizer,
    register_adapter,
    unregister_adapter,
)

__all__ = ["OptimizerAdapter", "StepTerms", "adapter_for", "innermost_optimizer", "register_adapter", "unregister_adapter"]
