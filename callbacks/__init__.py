"""Framework adapters: Lightning ``ShapleyCallback``, Accelerate ``ShapleyHook`` and Hugging Face
``ShapleyTrainerCallback``, and ``causal_lm_loss`` (the Hugging Face adapter's default validation
loss, next-token cross-entropy).

Each is imported on first use, so using one framework never imports the other.
"""

from __future__ import annotations

__all__ = ["ShapleyCallback", "ShapleyHook", "ShapleyTrainerCallback", "causal_lm_loss"]


def __getattr__(name: str):
    if name == "ShapleyCallback":
        from inrun_shapley.callbacks.lightning import ShapleyCallback

        return ShapleyCallback
    if name == "ShapleyHook":
        from inrun_shapley.callbacks.accelerate import ShapleyHook

        return ShapleyHook
    if name == "ShapleyTrainerCallback":
        from inrun_shapley.callbacks.huggingface import ShapleyTrainerCallback

        return ShapleyTrainerCallback
    if name == "causal_lm_loss":
        from inrun_shapley.callbacks.huggingface import causal_lm_loss

        return causal_lm_loss
    raise AttributeError(f"module 'inrun_shapley.callbacks' has no attribute {name!r}")
