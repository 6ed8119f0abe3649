"""The user's ``fn(model, batch)`` evaluated at other weights: stacked chains and per-sample gradients.

Every function here calls ``fn`` through :func:`torch.func.functional_call` on a thin wrapper
module, so ``fn`` sees the user's model whose sampled parameters are, for the duration of the
call, the tensors given (other parameters and buffers stay as they are). That is what lets the C
chains of the sampler run as one vmapped computation over parameters stacked ``[C, ...]``, and the
control variate take the gradient of every traced value at w*.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, jacrev, vmap

from inrun_shapley.batches import map_tensors
from inrun_shapley.posthoc.bif.config import LossFn
from inrun_shapley.posthoc.bif.evaluation import evaluate, iter_chunks

Params = dict[str, torch.Tensor]
"""Sampled parameter name (as in ``model.named_parameters()``) -> tensor."""


class _Bound(nn.Module):
    """``forward(batch) = fn(model, batch)``; its parameters are the model's, prefixed ``model.``."""

    def __init__(self, model: nn.Module, fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


class FunctionalModel:
    """The user's model and functions, callable at given values of the sampled parameters.

    Args:
        model: the user's model (prepared by ``ModelSnapshot.enter_sampling_mode``).
        names: names of the sampled parameters, in ``model.named_parameters()`` order.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = list(names)

    def call(self, fn: LossFn, params: Params, batch: Any) -> torch.Tensor:
        """``fn(model, batch)`` with the sampled parameters replaced by ``params``."""
        bound = _Bound(self.model, fn)
        return functional_call(bound, {f"model.{k}": v for k, v in params.items()}, (batch,))

    def traced(
        self, fn: LossFn, stacked: Params, source: Any, size: Optional[int], what: str, per_sample: bool
    ) -> torch.Tensor:
        """Values of ``fn`` on every chunk of ``source`` for each of C stacked parameter sets.

        Args:
            fn: ``fn(model, batch) -> [B]`` or ``[B, ...]``.
            stacked: sampled parameters stacked along a leading chain dimension ``[C, ...]``.
            source, size, what, per_sample: as in :func:`~inrun_shapley.posthoc.bif.evaluation.evaluate`.

        Returns:
            ``[C, n]`` (``per_sample``) or ``[C, n, ...]`` detached values.
        """
        def one(params: Params) -> torch.Tensor:
            return evaluate(None, lambda _m, chunk: self.call(fn, params, chunk), source, size, what, per_sample)

        with torch.no_grad():
            return vmap(one)(stacked)

    def mean_loss_grads(self, fn: LossFn, stacked: Params, batches: Any, shared_batch: bool) -> tuple[Params, torch.Tensor]:
        """Gradients of each chain's minibatch mean loss, vmapped over the chains.

        Args:
            fn: the per-sample training loss.
            stacked: ``[C, ...]`` sampled parameters.
            batches: one batch per chain stacked along a leading ``[C]`` dimension, or one batch
                for every chain when ``shared_batch``.
            shared_batch: whether ``batches`` is one batch used by every chain.

        Returns:
            ``(grads [C, ...] per parameter, mean losses [C])``.
        """
        def mean_loss(params: Params, batch: Any) -> torch.Tensor:
            return self.call(fn, params, batch).mean()

        in_dims = (0, None if shared_batch else 0)
        with torch.enable_grad():
            grads, values = vmap(grad_and_value(mean_loss), in_dims=in_dims)(stacked, batches)
        return grads, values


def per_sample_jacobian(
    functional: FunctionalModel, fn: LossFn, anchor: Params, source: Any, size: Optional[int], what: str,
    per_sample: bool,
) -> torch.Tensor:
    """Gradient of every traced value at ``anchor`` with respect to the flattened sampled parameters.

    Each sample is evaluated alone (a batch of one row, through ``vmap`` over rows), so a value's
    gradient is that of the sample's own loss or observable.

    Args:
        functional: the model wrapper.
        fn: ``fn(model, batch) -> [B]`` or ``[B, ...]``.
        anchor: the sampled parameters at w*.
        source, size, what: the traced samples (see ``evaluation.iter_chunks``).
        per_sample: average trailing dims away (training losses: one value per sample); otherwise
            one row per flattened observable.

    Returns:
        ``[n_values, d]`` in the parameters' dtype, d = number of sampled scalars, columns in
        ``names`` order, each parameter flattened row-major.
    """
    names = functional.names

    def values(params: Params, row: Any) -> torch.Tensor:
        out = functional.call(fn, params, map_tensors(lambda t: t.unsqueeze(0), row))[0]
        return out.reshape(-1).mean().reshape(1) if per_sample else out.reshape(-1)

    rows = []
    for chunk in iter_chunks(source, size, what):
        jac = vmap(jacrev(values), in_dims=(None, 0))(anchor, chunk)  # name -> [B, k, *shape]
        flat = torch.cat([jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1) for n in names], dim=2)
        rows.append(flat.reshape(-1, flat.shape[-1]).detach())
    return torch.cat(rows, dim=0)


__all__ = ["FunctionalModel", "Params", "per_sample_jacobian"]
