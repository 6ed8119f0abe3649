"""How far to trust a BIF run: MCMC diagnostics (pure functions) and their record.

:func:`split_rhat` and :func:`effective_sample_size` judge mixing of ``[C, T]`` traces;
:func:`rank_stability` compares two runs' attributions; :class:`BIFDiagnostics` holds what one
run measured about its sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.metrics import spearman


def split_rhat(traces: torch.Tensor) -> torch.Tensor:
    """Split-R̂ (Gelman–Rubin potential scale reduction on half-chains).

    Each of the C chains is cut into two halves of n = ⌊T/2⌋ draws (the middle draw is dropped
    when T is odd), giving m = 2C sequences x_{j,s}. With sequence means x̄_j, overall mean x̄,
    within-sequence variance ``W = 1/m Σ_j s_j²`` (``s_j² = 1/(n−1) Σ_s (x_{j,s} − x̄_j)²``) and
    between-sequence variance ``B = n/(m−1) Σ_j (x̄_j − x̄)²``::

        var⁺ = (n−1)/n · W + B/n,        R̂ = sqrt(var⁺ / W)

    R̂ ≈ 1 when the chains agree; values above ~1.05 mean more burn-in or draws are needed.

    Args:
        traces: ``[C, T]`` or ``[C, T, ...]``; statistics are computed per trailing index.

    Returns:
        R̂, fp64, shape ``traces.shape[2:]``; ``nan`` where W = 0 (a constant trace).
    """
    x = torch.as_tensor(traces).to(torch.float64)
    if x.dim() < 2 or x.shape[1] < 4:
        raise ConfigurationError(f"split_rhat needs traces of shape [C, T>=4, ...], got {tuple(x.shape)}")
    n = x.shape[1] // 2
    halves = torch.cat([x[:, :n], x[:, x.shape[1] - n :]], dim=0)  # [2C, n, ...]
    means = halves.mean(dim=1)
    w = halves.var(dim=1, unbiased=True).mean(dim=0)
    b = n * means.var(dim=0, unbiased=True)
    var_plus = (n - 1) / n * w + b / n
    return torch.where(w > 0, torch.sqrt(var_plus / w), torch.full_like(w, float("nan")))


def effective_sample_size(traces: torch.Tensor) -> torch.Tensor:
    """Multi-chain effective sample size with Geyer's initial monotone positive sequence.

    For C chains of T draws, with per-chain autocovariance
    ``γ_c(t) = 1/T Σ_{s<T−t} (x_{c,s} − x̄_c)(x_{c,s+t} − x̄_c)`` (computed by FFT),
    ``W = mean_c γ_c(0)·T/(T−1)`` and ``var⁺ = (T−1)/T·W + var_c(x̄_c)`` (the second term only
    when C > 1), the combined autocorrelation is::

        ρ_0 = 1,        ρ_t = 1 − (W − mean_c γ_c(t)) / var⁺      (t ≥ 1)

    Pair sums ``P_k = ρ_{2k} + ρ_{2k+1}`` are kept up to (excluding) the first negative one, then
    made non-increasing (Geyer's initial monotone sequence). Then::

        τ = −1 + 2·Σ_k P_k   (= 1 + 2·Σ_{t≥1} ρ_t),      ESS = C·T / max(τ, 1/log10(C·T))

    (the floor caps ESS at C·T·log10(C·T) for antithetic chains).

    Args:
        traces: ``[C, T]`` or ``[C, T, ...]``; computed per trailing index.

    Returns:
        ESS in draws, fp64, shape ``traces.shape[2:]``; ``nan`` for a constant trace.
    """
    x = torch.as_tensor(traces).to(torch.float64)
    if x.dim() < 2 or x.shape[1] < 4:
        raise ConfigurationError(f"effective_sample_size needs [C, T>=4, ...], got {tuple(x.shape)}")
    c, t = x.shape[0], x.shape[1]
    trailing = x.shape[2:]
    x = x.reshape(c, t, -1)
    centered = x - x.mean(dim=1, keepdim=True)
    size = 1 << (2 * t - 1).bit_length()
    spec = torch.fft.rfft(centered, n=size, dim=1)
    acov = torch.fft.irfft(spec * spec.conj(), n=size, dim=1)[:, :t] / t  # [C, T, K]
    w = acov[:, 0].mean(dim=0) * t / (t - 1)
    var_plus = (t - 1) / t * w
    if c > 1:
        var_plus = var_plus + x.mean(dim=1).var(dim=0, unbiased=True)
    rho = 1.0 - (w - acov.mean(dim=0)) / var_plus  # [T, K]
    rho[0] = 1.0
    n_pairs = t // 2
    pairs = rho[: 2 * n_pairs : 2] + rho[1 : 2 * n_pairs : 2]  # [n_pairs, K]
    negative_seen = torch.cumsum((pairs < 0).to(torch.int64), dim=0) > 0
    pairs = torch.where(negative_seen, torch.zeros_like(pairs), pairs)
    pairs = torch.cummin(pairs, dim=0).values
    tau = -1.0 + 2.0 * pairs.sum(dim=0)
    n_total = c * t
    tau = torch.clamp(tau, min=1.0 / math.log10(max(n_total, 10)))
    ess = n_total / tau
    ess = torch.where(var_plus > 0, ess, torch.full_like(ess, float("nan")))
    return ess.reshape(trailing)


def rank_stability(a: Any, b: Any) -> float:
    """Mean over observables of the Spearman correlation between two attribution matrices.

    Use it to compare two runs with different seeds (seed-to-seed rank stability): 1 = the
    per-query rankings of training samples agree exactly.

    Args:
        a: ``[n_train, ...]`` scores (tensor or array), or a
            :class:`~inrun_shapley.posthoc.bif.BIFResult`, whose ``.bif`` is used.
        b: same shape as ``a``.

    Returns:
        Mean over the flattened trailing (observable) index of the Spearman correlation across
        training samples; observables with constant scores are skipped.
    """
    def as_matrix(scores: Any) -> np.ndarray:
        scores = getattr(scores, "bif", scores)  # a BIFResult, or the scores themselves
        scores = np.asarray(torch.as_tensor(scores), dtype=np.float64)
        return scores.reshape(scores.shape[0], -1)

    xa, xb = as_matrix(a), as_matrix(b)
    if xa.shape != xb.shape:
        raise ConfigurationError(f"rank_stability: shapes differ: {xa.shape} vs {xb.shape}")
    values = [spearman(xa[:, q], xb[:, q]) for q in range(xa.shape[1])]
    return float(np.nanmean(values))


@dataclass
class BIFDiagnostics:
    """What a user needs to judge the sampler. All tensors are fp64 on the CPU.

    Attributes:
        loss_trace: ``[C, T]`` mean loss of the traced training samples at each draw (loss units).
        observable_trace: ``[C, T]`` mean observable at each draw.
        sgld_loss: ``[C, steps_per_chain]`` minibatch mean loss at every SGLD step (incl. burn-in),
            evaluated at the state before the step.
        drift: ``[C, T]`` relative drift ``‖w − w*‖₂ / ‖w*‖₂`` at each draw, over the sampled
            parameters only (concatenated into one vector).
        drift_fraction: mean of ``drift`` over all C·T draws (dimensionless; 0.01 = 1 %).
        loss_at_optimum: mean traced training loss at w*.
        rhat: split-R̂ of ``loss_trace`` (see :func:`split_rhat`).
        ess: effective sample size of ``loss_trace`` (see :func:`effective_sample_size`).
        rhat_observable: split-R̂ of ``observable_trace``.
        ess_observable: ESS of ``observable_trace``.
        rhat_per_sample: ``[n_train]`` split-R̂ of each ℓ_i trace (in-memory path only, else None).
        ess_per_sample: ``[n_train]`` ESS of each ℓ_i trace (in-memory path only, else None).
    """

    loss_trace: torch.Tensor
    observable_trace: torch.Tensor
    sgld_loss: torch.Tensor
    drift: torch.Tensor
    drift_fraction: float
    loss_at_optimum: float
    rhat: float
    ess: float
    rhat_observable: float
    ess_observable: float
    rhat_per_sample: Optional[torch.Tensor] = None
    ess_per_sample: Optional[torch.Tensor] = None

    @classmethod
    def from_traces(
        cls,
        loss_trace: torch.Tensor,
        observable_trace: torch.Tensor,
        sgld_loss: torch.Tensor,
        drift: torch.Tensor,
        loss_at_optimum: float,
        sample_traces: Optional[torch.Tensor] = None,
    ) -> "BIFDiagnostics":
        """Compute R̂ and ESS of the recorded traces.

        Args:
            loss_trace: ``[C, T]`` fp64 mean traced training loss per draw.
            observable_trace: ``[C, T]`` fp64 mean observable per draw.
            sgld_loss: ``[C, steps_per_chain]`` fp64 minibatch loss per SGLD step.
            drift: ``[C, T]`` fp64 relative drift per draw.
            loss_at_optimum: mean traced training loss at w*.
            sample_traces: ``[C, T, n_train]`` per-sample loss traces when they were kept (the
                in-memory path), else None (then no per-sample R̂/ESS).
        """
        return cls(
            loss_trace=loss_trace,
            observable_trace=observable_trace,
            sgld_loss=sgld_loss,
            drift=drift,
            drift_fraction=float(drift.mean()),
            loss_at_optimum=loss_at_optimum,
            rhat=float(split_rhat(loss_trace)),
            ess=float(effective_sample_size(loss_trace)),
            rhat_observable=float(split_rhat(observable_trace)),
            ess_observable=float(effective_sample_size(observable_trace)),
            rhat_per_sample=None if sample_traces is None else split_rhat(sample_traces),
            ess_per_sample=None if sample_traces is None else effective_sample_size(sample_traces),
        )


__all__ = ["BIFDiagnostics", "effective_sample_size", "rank_stability", "split_rhat"]
