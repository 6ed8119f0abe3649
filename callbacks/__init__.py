"""Framework adapters: Lightning ``ShapleyCallback``, Accelerate ``ShapleyHook`` and Hugging Face
``ShapleyTrainerCallback``.

Each is imported on first use, so using one framework never imports the other.
"""

from __future__ import annotations

__all__ = ["ShapleyCallback", "ShapleyHook", "ShapleyTrainerCallback"]


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
    raise AttributeError(f"module 'inrun_shapley.callbacks' has no attribute {name!r}")
