"""The diagonal preconditioner of Adam/AdamW, read from a trained optimizer's state, for
:func:`~inrun_shapley.posthoc.weighting.compute_group_components`."""

from __future__ import annotations

import torch
from torch import nn

from inrun_shapley.errors import ConfigurationError, UnsupportedOptimizerError
from inrun_shapley.optim import adam
from inrun_shapley.posthoc.weighting.groups import listing


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module, eps: float | None = None
) -> dict[str, torch.Tensor]:
    """Adam/AdamW's diagonal preconditioner ``P = 1 / (sqrt(v_t / (1 − β2^t)) + ε)``.

    Reads torch's own state (``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad, ``step``).

    Args:
        optimizer: a ``torch.optim.Adam``/``AdamW`` (or compatible) optimizer after ≥ 1 step.
        model: the model whose trainable parameters it optimizes (for the names).
        eps: override the optimizer's ε.

    Returns:
        ``{parameter name: P}`` with ``P`` shaped like the parameter (units 1/gradient), ready
        for ``compute_group_components(preconditioner=...)``.

    Raises:
        UnsupportedOptimizerError: the state has no ``exp_avg_sq`` (not an Adam family optimizer).
        ConfigurationError: a trainable parameter has no optimizer state yet.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, torch.Tensor] = {}
    missing = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p, {})
        if not state:
            missing.append(name)
            continue
        if adam.EXP_AVG_SQ not in state:
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__} keeps no '{adam.EXP_AVG_SQ}'; adam_preconditioner needs "
                "Adam/AdamW state. Pass your own {name: P} dict instead."
            )
        out[name] = adam.preconditioner(group_of[id(p)], state, eps)
    if missing:
        raise ConfigurationError(
            f"no optimizer state for {listing(missing)}; take at least one optimizer step "
            "with these parameters before building the preconditioner."
        )
    return out


__all__ = ["adam_preconditioner"]
