"""The tracker's option check: combinations of estimator, order and per-query options that are
refused at construction, each with what to pass instead."""

from __future__ import annotations

from inrun_shapley.engine.directions import Estimator
from inrun_shapley.engine.queries import QUERY_PATHS
from inrun_shapley.errors import ConfigurationError

__all__ = ["KERNELS", "check_kernels", "check_options"]

KERNELS = ("foreach", "compiled")
"""How the midpoint's elementwise pass runs (the tracker's ``kernels`` option)."""


def check_options(estimator: Estimator, order: int, per_query: bool, query_path: str,
                   val_sample_size: int | None, group_values: bool) -> None:
    """Raise ConfigurationError on an inconsistent combination of tracker options."""
    if order not in (1, 2):
        raise ConfigurationError(f"order must be 1 or 2, got {order!r}")
    if order == 2 and estimator is not Estimator.SHAPLEY:
        raise ConfigurationError("order=2 is defined for estimator='shapley' only")
    if per_query and order == 2 and query_path == "ghost":
        raise ConfigurationError("second-order per-query values take the exact path: use query_path='exact' or 'auto'")
    if per_query and val_sample_size is not None:
        raise ConfigurationError("per_query values use every query at every step: leave val_sample_size=None")
    if query_path not in QUERY_PATHS:
        raise ConfigurationError(f"query_path must be one of {QUERY_PATHS}, got {query_path!r}")
    if query_path != "auto" and not per_query:
        raise ConfigurationError("query_path applies to per-query values: pass per_query=True")
    if query_path == "ghost" and not estimator.has_ghost_form:
        raise ConfigurationError(
            f"the ghost path has no form for the {estimator.value!r} estimator (its Jacobian changes sign): "
            "use query_path='exact' or 'auto'"
        )
    if per_query and group_values:
        raise ConfigurationError("group_values are kept for the mean validation loss only (per_query=False)")


def check_kernels(kernels: str) -> None:
    """Raise ConfigurationError unless ``kernels`` is one of :data:`KERNELS`."""
    if kernels not in KERNELS:
        raise ConfigurationError(f"kernels must be one of {KERNELS}, got {kernels!r}")
