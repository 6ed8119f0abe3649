"""Pooled covariances of the traced values: keep the traces, or accumulate co-moments online.

Both stores receive, at every draw, ``x`` = the n_x traced training losses and ``y`` = the n_y
flattened observables, each relative to its value at w*, and reduce all C·T pooled draws to
``(Cov(x, y) [n_x, n_y], Var(x) [n_x], Var(y) [n_y])`` in fp64 with denominator N − 1. The two
agree up to fp64 rounding; only :class:`TraceStore` keeps the per-sample traces needed for
per-sample R̂ and ESS.
"""

from __future__ import annotations

from typing import Optional, Union

import torch


class TraceStore:
    """Keeps the C×T traces (in ``trace_dtype``) and reduces them in fp64 at the end.

    Attributes:
        x: ``[C, T, n_x]`` traced training losses.
        y: ``[C, T, n_y]`` traced observables.
    """

    def __init__(self, chains: int, draws: int, n_x: int, n_y: int, dtype: torch.dtype) -> None:
        self.x = torch.empty(chains, draws, n_x, dtype=dtype)
        self.y = torch.empty(chains, draws, n_y, dtype=dtype)

    def add(self, chain: int, draw: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Record draw ``draw`` of chain ``chain``: ``x`` is ``[n_x]``, ``y`` is ``[n_y]``."""
        self.x[chain, draw] = x
        self.y[chain, draw] = y

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled (cov_xy [n_x, n_y], var_x [n_x], var_y [n_y]) with denominator N − 1."""
        x = self.x.reshape(-1, self.x.shape[-1]).to(torch.float64)
        y = self.y.reshape(-1, self.y.shape[-1]).to(torch.float64)
        x = x - x.mean(dim=0)
        y = y - y.mean(dim=0)
        n = x.shape[0]
        return x.T @ y / (n - 1), (x * x).sum(dim=0) / (n - 1), (y * y).sum(dim=0) / (n - 1)


class OnlineMoments:
    """Running fp64 means and co-moments (Welford's update), one draw at a time.

    With n draws seen, after a new pair (x, y): ``δx = x − x̄``, ``x̄ += δx/n``, ``δy = y − ȳ``,
    ``ȳ += δy/n``; ``M2x += δx ⊙ (x − x̄_new)``, ``M2y += δy ⊙ (y − ȳ_new)``,
    ``Cxy += δx ⊗ (y − ȳ_new)``. Cov = Cxy / (n − 1).
    """

    def __init__(self, n_x: int, n_y: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.n = 0
        self.mean_x = torch.zeros(n_x, dtype=torch.float64)
        self.mean_y = torch.zeros(n_y, dtype=torch.float64)
        self.m2_x = torch.zeros(n_x, dtype=torch.float64)
        self.m2_y = torch.zeros(n_y, dtype=torch.float64)
        self.c_xy = torch.zeros(n_x, n_y, dtype=torch.float64)

    def add(self, chain: int, draw: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold in one draw (``chain`` and ``draw`` are ignored: the moments are pooled)."""
        # Round through trace_dtype first so that both paths see identical values.
        x = x.to(self.dtype).to(torch.float64)
        y = y.to(self.dtype).to(torch.float64)
        self.n += 1
        dx = x - self.mean_x
        self.mean_x += dx / self.n
        dy = y - self.mean_y
        self.mean_y += dy / self.n
        dy_new = y - self.mean_y
        self.m2_x += dx * (x - self.mean_x)
        self.m2_y += dy * dy_new
        self.c_xy += torch.outer(dx, dy_new)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled (cov_xy [n_x, n_y], var_x [n_x], var_y [n_y]) with denominator N − 1."""
        d = self.n - 1
        return self.c_xy / d, self.m2_x / d, self.m2_y / d


MomentStore = Union[TraceStore, OnlineMoments]


def make_store(
    chains: int, draws: int, n_x: int, n_y: int, dtype: torch.dtype, online: bool
) -> MomentStore:
    """An :class:`OnlineMoments` when ``online``, else a :class:`TraceStore` for C×T draws."""
    return OnlineMoments(n_x, n_y, dtype) if online else TraceStore(chains, draws, n_x, n_y, dtype)


def covariance_and_correlation(
    store: MomentStore, correction: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Cov(x, y), Corr(x, y))``, both ``[n_x, n_y]`` fp64; the correlation is ``nan`` where
    either trace is constant.

    Args:
        store: the pooled draws.
        correction: ``[n_x, n_y]`` zero-mean control variate subtracted from the covariance (the
            correlation is then the corrected covariance over the plain standard deviations).
    """
    cov, var_x, var_y = store.moments()
    if correction is not None:
        cov = cov - correction
    denom = torch.sqrt(torch.outer(var_x, var_y))
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    corr = torch.where(denom > 0, cov / safe, torch.full_like(cov, float("nan")))
    return cov, corr


__all__ = ["MomentStore", "OnlineMoments", "TraceStore", "covariance_and_correlation", "make_store"]
