"""One loss convention for every tool: ``fn(model, batch)``.

The tracker, ``bayesian_influence`` and ``adjoint_influence`` take losses as
``fn(model, batch) -> [B]`` per-sample losses (or their mean). The weighting module used to take
``loss_fn(outputs, targets)``; that spelling still works for one release, with a
:class:`DeprecationWarning` naming the new one, through :func:`model_batch_loss`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

_OUTPUT_NAMES = {"input", "inputs", "output", "outputs", "out", "logits", "pred", "preds", "prediction",
                 "predictions", "y_hat", "yhat", "o"}
_MODEL_NAMES = {"model", "m", "net", "module", "network", "mdl"}


def _first_parameter(fn: Callable) -> str | None:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins, some C functions
        return None
    return names[0].lower() if names else None


def _deprecated(fn: Callable, what: str) -> Callable:
    warnings.warn(
        f"{what}=loss(outputs, targets) is deprecated and will be removed in the next release: pass "
        f"{what}=fn(model, batch) returning per-sample losses, the convention of the tracker, "
        "bayesian_influence and adjoint_influence (e.g. lambda m, b: F.cross_entropy(m(b[0]), b[1], "
        "reduction='none'))",
        DeprecationWarning,
        stacklevel=5,
    )

    def as_model_batch(model, batch):
        return fn(model(batch[0]), batch[1])

    return as_model_batch


def model_batch_loss(fn: Callable, what: str, probe: tuple[Any, Any] | None = None) -> Callable:
    """``fn`` as a ``fn(model, batch)`` loss.

    A function whose first parameter is named like model outputs (``outputs``, ``logits``,
    ``input`` as in ``torch.nn.functional`` losses...) is taken as the deprecated
    ``loss(outputs, targets)`` spelling and wrapped (with a :class:`DeprecationWarning`); one
    whose first parameter is named like a model is used as it is. Otherwise ``probe`` =
    ``(model, batch)`` decides: ``fn(model, batch)`` is tried, and if it fails while
    ``fn(model(batch[0]), batch[1])`` works, the old spelling is assumed.

    Args:
        fn: the user's loss.
        what: the argument's name, for messages.
        probe: a model and a small batch ``(inputs, targets)`` to try ``fn`` on.
    """
    first = _first_parameter(fn)
    if first in _OUTPUT_NAMES:
        return _deprecated(fn, what)
    if first in _MODEL_NAMES or probe is None:
        return fn
    model, batch = probe
    try:
        fn(model, batch)
        return fn
    except Exception as new_error:  # noqa: BLE001 - decided below, re-raised when neither works
        try:
            fn(model(batch[0]), batch[1])
        except Exception:  # noqa: BLE001
            raise new_error
        return _deprecated(fn, what)


__all__ = ["model_batch_loss"]
