"""Bayesian Influence Function (BIF): post-hoc attribution by sampling a local posterior.

The BIF of training sample i on an observable q is a covariance under a localized, tempered
posterior around the trained weights w*::

    p(w) ∝ exp(−nβ·L_n(w) − γ/2·‖w − w*‖²)             (L_n = mean training loss)
    BIF[i, q] = −Cov_p(ℓ_i(w), φ_q(w))

The posterior is sampled with SGLD (stochastic-gradient Langevin dynamics) on minibatch mean
losses, step size ε::

    w ← w − ε/2·(nβ·∇L_batch(w) + γ·(w − w*)) + sqrt(ε)·ξ,      ξ ~ N(0, I)

C chains start from w*; after a burn-in, every ``thin``-th state is a draw; all C·T draws are
pooled. At every draw, with no gradients and the model in eval mode, the per-sample losses ℓ_i of
the training samples being attributed and the observables φ_q (by default the query losses, or
per-token losses for sequences) are recorded.

**Sign convention (one for the whole module).** Upweighting sample i in the tempered likelihood,
``exp(−β·Σ_j w_j·ℓ_j)`` with β = nβ/n, changes the posterior mean of any observable by
``∂E[φ_q]/∂w_i = −β·Cov(ℓ_i, φ_q) = β·BIF[i, q]``. So **positive BIF = including sample i raises
φ_q**. With φ = query loss, a negative BIF means i *helps* q (lowers its loss); with φ = a margin
or log-probability, a positive BIF means i helps. :attr:`BIFResult.influence` is the same
quantity scaled by β, in units of the observable per unit of sample weight; in the Laplace limit
(large γ) it equals the classical damped influence function
``−∇φ_qᵀ(n·H + (γ/β)·I)⁻¹∇ℓ_i`` (H = Hessian of L_n at w*), and ``.bif`` itself is
``−∇φ_qᵀ(nβ·H + γ·I)⁻¹∇ℓ_i``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x, y = torch.randn(64, 3), torch.randn(64)
    >>> model = nn.Linear(3, 1)
    >>> def loss_fn(m, batch):
    ...     xb, yb = batch
    ...     return 0.5 * (m(xb).squeeze(-1) - yb) ** 2      # per-sample, reduction="none"
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    >>> cfg = BIFConfig(step_size=1e-3, gamma=100.0, chains=2, draws=50)
    >>> res = bayesian_influence(model, loss_fn, loader, (x[:10], y[:10]), (x[10:13], y[10:13]),
    ...                          config=cfg, progress=False)
    >>> tuple(res.bif.shape)
    (10, 3)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from inrun_shapley.errors import ConfigurationError, NonFiniteError
from inrun_shapley.metrics import spearman

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``fn(model, batch) -> per-sample loss`` with ``reduction="none"``: shape ``[B]`` or ``[B, ...]``."""

ParamSelection = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool], None]
"""Parameter names (or module-name prefixes), or a predicate ``(name, param) -> bool``."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class BIFConfig:
    """Settings of the SGLD sampler and of the covariance accumulation.

    Attributes:
        step_size: SGLD step size ε (units of parameter² per unit of potential). Keep
            ``step_size * gamma`` ≲ 0.1 for small models; a larger ε mixes faster but biases the
            covariance by about ``ε·λ/4`` relative along an eigen-direction with posterior
            precision λ.
        n_beta: nβ, the inverse temperature times the dataset size, multiplying the *mean*
            training loss. ``None`` = ``B / log(B)`` with B the training batch size.
        gamma: γ, strength of the localizing Gaussian ``γ/2·‖w − w*‖²`` (1 / parameter²).
        chains: C, number of independent chains, each started from w*.
        draws: T, recorded draws per chain (after burn-in and thinning).
        burn_in: SGLD steps discarded at the start of each chain; ``None`` = ``draws``.
        thin: record every ``thin``-th SGLD step after burn-in (steps per chain:
            ``burn_in + draws * thin``).
        seed: base seed. Chain c draws its Gaussian noise from a ``torch.Generator`` seeded with a
            hash of ``(seed, c)`` (numpy ``SeedSequence``), so different seeds never share chains,
            and runs the chain under ``torch.random.fork_rng`` seeded the same way, so a shuffling
            ``DataLoader`` without its own generator is reproducible and the global RNG is left
            untouched.
        dataset_size: n, the number of training samples behind L_n, used only for
            :attr:`BIFResult.influence` (β = nβ/n). ``None`` = ``len(train_loader.dataset)``.
        params: which parameters to sample (names, module-name prefixes, or a predicate
            ``(name, param) -> bool``); the others stay at w*. ``None`` = every parameter with
            ``requires_grad``. The ``params`` argument of :func:`bayesian_influence` overrides it.
        eval_batch_size: chunk size for evaluating ``train_samples``/``queries`` given as one
            in-memory batch (ignored for a ``DataLoader``). ``None`` = one chunk.
        online: ``True`` = accumulate running fp64 co-moments (Welford) instead of keeping the
            traces; ``False`` = keep traces; ``None`` = keep traces unless they exceed
            ``max_traces_in_memory`` elements. Both paths give the same result up to fp64
            rounding; only the in-memory path gives per-sample R̂/ESS.
        max_traces_in_memory: trace elements ``C·T·(n_train + n_observables)`` allowed in memory
            when ``online`` is None.
        divergence_factor: a chain diverged when a minibatch loss or the mean traced training
            loss exceeds ``divergence_factor · max(L0, divergence_floor)``, with L0 the mean
            traced training loss at w* (or on any NaN/inf).
        divergence_floor: floor of the reference loss above, in loss units, so that a model with
            near-zero loss at w* is not flagged for ordinary fluctuations.
        trace_dtype: dtype in which traces are stored (covariances are always computed in fp64).
            Values are stored relative to their value at w*, which keeps fp32 precise.
    """

    step_size: float = 1e-4
    n_beta: Optional[float] = None
    gamma: float = 1e3
    chains: int = 4
    draws: int = 200
    burn_in: Optional[int] = None
    thin: int = 1
    seed: int = 0
    dataset_size: Optional[int] = None
    params: ParamSelection = None
    eval_batch_size: Optional[int] = 1024
    online: Optional[bool] = None
    max_traces_in_memory: int = 100_000_000
    divergence_factor: float = 100.0
    divergence_floor: float = 1.0
    trace_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        problems = []

        def positive(name: str, allow_none: bool = False, integer: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and integer:
                ok = isinstance(value, int) or float(value).is_integer()
            if not ok or not math.isfinite(value) or value <= 0:
                kind = "a positive integer" if integer else "a positive finite number"
                problems.append(f"{name} must be {kind}, got {value!r}")

        positive("step_size")
        positive("n_beta", allow_none=True)
        positive("chains", integer=True)
        positive("thin", integer=True)
        positive("dataset_size", allow_none=True, integer=True)
        positive("eval_batch_size", allow_none=True, integer=True)
        positive("max_traces_in_memory", integer=True)
        positive("divergence_factor")
        positive("divergence_floor")
        if not isinstance(self.gamma, (int, float)) or not math.isfinite(self.gamma) or self.gamma < 0:
            problems.append(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if not isinstance(self.draws, int) or self.draws < 4:
            problems.append(f"draws must be an integer >= 4 (split-R̂ needs two halves), got {self.draws!r}")
        if self.burn_in is not None and (not isinstance(self.burn_in, int) or self.burn_in < 0):
            problems.append(f"burn_in must be None or an integer >= 0, got {self.burn_in!r}")
        if not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if self.online not in (None, True, False):
            problems.append(f"online must be None, True or False, got {self.online!r}")
        if not isinstance(self.trace_dtype, torch.dtype) or not self.trace_dtype.is_floating_point:
            problems.append(f"trace_dtype must be a floating torch.dtype, got {self.trace_dtype!r}")
        if problems:
            raise ConfigurationError("Invalid BIFConfig: " + "; ".join(problems) + ".")

    @property
    def resolved_burn_in(self) -> int:
        """Burn-in steps actually used (``draws`` when ``burn_in`` is None)."""
        return self.draws if self.burn_in is None else self.burn_in

    @property
    def steps_per_chain(self) -> int:
        """SGLD steps per chain: ``burn_in + draws * thin``."""
        return self.resolved_burn_in + self.draws * self.thin


# --------------------------------------------------------------------------------------------
# MCMC diagnostics (pure functions)
# --------------------------------------------------------------------------------------------


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


def rank_stability(a: Union["BIFResult", torch.Tensor, np.ndarray], b: Union["BIFResult", torch.Tensor, np.ndarray]) -> float:
    """Mean over observables of the Spearman correlation between two attribution matrices.

    Use it to compare two runs with different seeds (seed-to-seed rank stability): 1 = the
    per-query rankings of training samples agree exactly.

    Args:
        a: ``[n_train, ...]`` scores (or a :class:`BIFResult`, whose ``.bif`` is used).
        b: same shape as ``a``.

    Returns:
        Mean over the flattened trailing (observable) index of the Spearman correlation across
        training samples; observables with constant scores are skipped.
    """
    def as_matrix(scores: Any) -> np.ndarray:
        scores = scores.bif if isinstance(scores, BIFResult) else scores
        scores = np.asarray(torch.as_tensor(scores), dtype=np.float64)
        return scores.reshape(scores.shape[0], -1)

    xa, xb = as_matrix(a), as_matrix(b)
    if xa.shape != xb.shape:
        raise ConfigurationError(f"rank_stability: shapes differ: {xa.shape} vs {xb.shape}")
    values = [spearman(xa[:, q], xb[:, q]) for q in range(xa.shape[1])]
    return float(np.nanmean(values))


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


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


@dataclass
class BIFResult:
    """Output of :func:`bayesian_influence`.

    Attributes:
        bif: ``[n_train, n_queries]`` (or ``[n_train, n_queries, *token_shape]`` for per-token
            observables) fp64, ``−Cov(ℓ_i, φ_q)`` over the pooled draws, in loss × observable
            units. Positive = including sample i raises φ_q (with φ = query loss: negative =
            i helps q).
        correlation: same shape, ``−Corr(ℓ_i, φ_q)`` (same sign convention, dimensionless);
            ``nan`` where a trace is constant.
        influence: same shape, ``β·bif`` with β = nβ / n: first-order change of the posterior mean
            of φ_q per unit upweighting of sample i in the summed training loss (observable units;
            positive = including i raises φ_q). Ready for LDS-style "sum over the subset"
            predictions.
        diagnostics: :class:`BIFDiagnostics`.
        config: the :class:`BIFConfig` used.
        n_beta: nβ actually used.
        dataset_size: n used for β (None when unknown; then ``influence`` is None).
        n_draws: pooled draws C·T.
        online: whether the online (co-moment) path was used.
        seconds: wall time of the whole call.
    """

    bif: torch.Tensor
    correlation: torch.Tensor
    influence: Optional[torch.Tensor]
    diagnostics: BIFDiagnostics
    config: BIFConfig
    n_beta: float
    dataset_size: Optional[int]
    n_draws: int
    online: bool
    seconds: float

    def rank_stability(self, other: "BIFResult") -> float:
        """Mean per-observable Spearman between this run's BIF and ``other``'s (see module fn)."""
        return rank_stability(self, other)

    def summary(self) -> str:
        """A short multi-line report of the run with plain-language warnings."""
        cfg, d = self.config, self.diagnostics
        lines = [
            f"Bayesian influence: {self.bif.shape[0]} training samples x "
            f"{int(np.prod(self.bif.shape[1:]))} observables, {cfg.chains} chains x {cfg.draws} draws "
            f"(burn-in {cfg.resolved_burn_in}, thin {cfg.thin}; {self.n_draws} pooled, "
            f"{'online' if self.online else 'in-memory'} accumulation)",
            f"SGLD: step_size={cfg.step_size:g}, n_beta={self.n_beta:g}, gamma={cfg.gamma:g}, "
            f"step_size*gamma={cfg.step_size * cfg.gamma:g}",
            f"traced loss: {d.loss_at_optimum:.4g} at w*, {float(d.loss_trace.mean()):.4g} under the "
            f"posterior (per chain: {', '.join(f'{v:.4g}' for v in d.loss_trace.mean(dim=1).tolist())})",
            f"split-R-hat {d.rhat:.3f}, ESS {d.ess:.0f} of {self.n_draws} draws (traced loss); "
            f"observable: R-hat {d.rhat_observable:.3f}, ESS {d.ess_observable:.0f}",
        ]
        if d.ess_per_sample is not None and d.rhat_per_sample is not None:
            lines.append(
                f"per-sample ESS: min {float(np.nanmin(d.ess_per_sample.numpy())):.0f}, "
                f"median {float(np.nanmedian(d.ess_per_sample.numpy())):.0f}; "
                f"per-sample R-hat max {float(np.nanmax(d.rhat_per_sample.numpy())):.3f}"
            )
        lines.append(
            f"drift |w-w*|/|w*|: mean {100 * d.drift_fraction:.3g}%, max {100 * float(d.drift.max()):.3g}%"
        )
        lines.append(f"time: {self.seconds:.2f} s")
        if not (d.rhat < 1.05):
            lines.append("warning: R-hat >= 1.05: chains disagree; raise burn_in or draws, or gamma.")
        if not (d.ess >= 100):
            lines.append("warning: ESS < 100: few effective draws; raise draws, thin, or step_size.")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _select_params(model: nn.Module, selection: ParamSelection) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if selection is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(selection):
        chosen = [(n, p) for n, p in named if selection(n, p)]
    else:
        wanted = [selection] if isinstance(selection, str) else list(selection)
        unknown = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n, _ in named)]
        if unknown:
            available = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise ConfigurationError(
                f"params: no parameter or module named {unknown}; available parameters: {available}."
            )
        chosen = [(n, p) for n, p in named if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ConfigurationError(
            "params: the selection matched no parameter (with params=None, no parameter has "
            "requires_grad=True); pass parameter names or a predicate (name, param) -> bool."
        )
    return chosen


class _ModelSnapshot:
    """Everything this module changes on the user's model, to be put back exactly."""

    def __init__(self, model: nn.Module, selected: list[tuple[str, nn.Parameter]]) -> None:
        self.model = model
        self.selected = [p for _, p in selected]
        self.anchors = [p.detach().clone() for p in self.selected]  # w*
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]

    def reset_to_anchor(self) -> None:
        with torch.no_grad():
            for p, w0 in zip(self.selected, self.anchors):
                p.copy_(w0)

    def restore(self) -> None:
        with torch.no_grad():
            self.reset_to_anchor()
            for b, value in self.buffers:
                b.copy_(value)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


def _chain_seed(seed: int, chain: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, chain]).generate_state(1)[0])


def _leading_dim(batch: Any) -> Optional[int]:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, (tuple, list)):
        for item in batch:
            n = _leading_dim(item)
            if n is not None:
                return n
    if isinstance(batch, dict):
        for item in batch.values():
            n = _leading_dim(item)
            if n is not None:
                return n
    return None


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, tuple):
        return tuple(_slice(item, start, stop) for item in batch)
    if isinstance(batch, list):
        return [_slice(item, start, stop) for item in batch]
    if isinstance(batch, dict):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    return batch


def _iter_chunks(source: Any, size: Optional[int], what: str) -> Iterator[Any]:
    if isinstance(source, DataLoader):
        if isinstance(source.sampler, RandomSampler):
            raise ConfigurationError(
                f"{what}: the DataLoader shuffles (RandomSampler); every draw must see the samples in "
                "the same order. Build it with shuffle=False."
            )
        yield from source
        return
    n = _leading_dim(source)
    if size is None or n is None or n <= size:
        yield source
        return
    for start in range(0, n, size):
        yield _slice(source, start, start + size)


def _evaluate(model: nn.Module, fn: LossFn, source: Any, size: Optional[int], what: str, per_sample: bool) -> torch.Tensor:
    """Evaluate ``fn`` on every chunk of ``source``; returns ``[n, ...]`` detached values."""
    outputs = []
    for chunk in _iter_chunks(source, size, what):
        out = fn(model, chunk)
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            got = "a scalar tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigurationError(
                f"{what}: the function must return per-sample values of shape [B] or [B, ...] "
                f"(reduction='none'), got {got}."
            )
        out = out.detach()
        if per_sample and out.dim() > 1:
            out = out.reshape(out.shape[0], -1).mean(dim=1)
        outputs.append(out)
    if not outputs:
        raise ConfigurationError(f"{what}: no batch to evaluate (empty input).")
    shapes = {tuple(o.shape[1:]) for o in outputs}
    if len(shapes) > 1:
        raise ConfigurationError(
            f"{what}: chunks returned different per-sample shapes {sorted(shapes)}; pad sequences to "
            "one length (and mask padding in the observable)."
        )
    return torch.cat(outputs, dim=0)


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigurationError("train_loader yielded no batch.")


class _TraceStore:
    """Keeps the C×T traces (in ``trace_dtype``) and reduces them in fp64 at the end."""

    def __init__(self, chains: int, draws: int, n_x: int, n_y: int, dtype: torch.dtype) -> None:
        self.x = torch.empty(chains, draws, n_x, dtype=dtype)
        self.y = torch.empty(chains, draws, n_y, dtype=dtype)

    def add(self, chain: int, draw: int, x: torch.Tensor, y: torch.Tensor) -> None:
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


class _OnlineMoments:
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
        d = self.n - 1
        return self.c_xy / d, self.m2_x / d, self.m2_y / d


def _dataset_size(loader: Any) -> Optional[int]:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _diverged(chain: int, where: str, what: str, cfg: BIFConfig, n_beta: float) -> NonFiniteError:
    return NonFiniteError(
        f"BIF sampler diverged in chain {chain} at {where}: {what}. Lower config.step_size "
        f"(now {cfg.step_size:g}) or raise config.gamma (now {cfg.gamma:g}) to keep the chain near "
        f"w*, or lower config.n_beta (now {n_beta:g}); keep step_size*gamma <= 0.1 "
        f"(now {cfg.step_size * cfg.gamma:g}). If the loss merely grows a lot without diverging, "
        f"raise config.divergence_factor (now {cfg.divergence_factor:g})."
    )


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def bayesian_influence(
    model: nn.Module,
    loss_fn: LossFn,
    train_loader: Any,
    train_samples: Any,
    queries: Any,
    config: Optional[BIFConfig] = None,
    observable_fn: Optional[LossFn] = None,
    params: ParamSelection = None,
    progress: bool = True,
) -> BIFResult:
    """Estimate the Bayesian Influence Function ``BIF[i, q] = −Cov(ℓ_i, φ_q)`` by SGLD.

    The model is used in place and put back exactly (parameters, buffers, ``requires_grad`` flags,
    train/eval mode) when the call returns, also on error. ``.grad`` is never touched. The whole
    run (SGLD steps and draws) is in eval mode: dropout is off and BatchNorm statistics frozen,
    so the posterior is that of the deterministic eval-mode loss.

    Args:
        model: the trained model; its current weights are w*.
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-sample losses (``reduction="none"``). Its
            mean over a ``train_loader`` batch is L_batch. Outputs ``[B, ...]`` are averaged over
            the trailing dims for training samples.
        train_loader: iterable of training batches for the SGLD gradient (cycled). Its batch size
            sets the default nβ = B/log(B); ``len(train_loader.dataset)`` sets n for ``influence``.
        train_samples: the training samples to attribute: one batch (tensor, tuple/list/dict of
            tensors; chunked by ``config.eval_batch_size``) or a ``DataLoader`` with
            ``shuffle=False``. Gives the n_train rows.
        queries: the query samples, same forms. Gives the observables.
        config: :class:`BIFConfig`; default ``BIFConfig()``.
        observable_fn: ``fn(model, batch) -> [B]`` or ``[B, T]`` observables (e.g. margins or
            per-token losses); default ``loss_fn``. ``[B, T]`` gives a per-token BIF.
        params: parameters to sample (names, module prefixes, or a predicate); overrides
            ``config.params``. Others stay at w*.
        progress: show a tqdm progress bar.

    Returns:
        :class:`BIFResult` with ``bif`` of shape ``[n_train, n_queries, *token_shape]``.

    Raises:
        ConfigurationError: invalid settings or inputs (message says what to change).
        NonFiniteError: a chain diverged (NaN/inf or loss above ``divergence_factor`` × the loss at
            w*); the message names the chain, the draw or step, and the knobs to turn.
    """
    start = time.perf_counter()
    cfg = config if config is not None else BIFConfig()
    if not isinstance(cfg, BIFConfig):
        raise ConfigurationError(f"config must be a BIFConfig, got {type(cfg).__name__}.")
    if params is not None and cfg.params is not None:
        raise ConfigurationError("params given both as an argument and in config.params; pass one.")
    observable_fn = loss_fn if observable_fn is None else observable_fn
    selected = _select_params(model, params if params is not None else cfg.params)
    dataset_size = cfg.dataset_size if cfg.dataset_size is not None else _dataset_size(train_loader)
    burn_in, steps = cfg.resolved_burn_in, cfg.steps_per_chain
    n_beta = cfg.n_beta
    if n_beta is None:
        batch_size = getattr(train_loader, "batch_size", None)
        if batch_size is not None:
            n_beta = _default_n_beta(batch_size)

    snapshot = _ModelSnapshot(model, selected)
    try:
        model.eval()
        selected_ids = {id(p) for _, p in selected}
        for p in model.parameters():
            p.requires_grad_(id(p) in selected_ids)
        sampled = snapshot.selected
        anchor_norm = math.sqrt(sum(float((w0.double() ** 2).sum()) for w0 in snapshot.anchors))
        anchor_norm = anchor_norm if anchor_norm > 0 else 1.0

        with torch.no_grad():
            ref_x = _evaluate(model, loss_fn, train_samples, cfg.eval_batch_size, "train_samples", True)
            ref_y_full = _evaluate(model, observable_fn, queries, cfg.eval_batch_size, "queries", False)
        obs_shape = tuple(ref_y_full.shape)
        ref_y = ref_y_full.reshape(-1)
        n_x, n_y = ref_x.shape[0], ref_y.shape[0]
        loss0 = float(ref_x.double().mean())
        if not math.isfinite(loss0) or not bool(torch.isfinite(ref_y).all()):
            raise NonFiniteError("BIF: the losses or observables are not finite at w* (before sampling); check the model and loss_fn.")
        limit = cfg.divergence_factor * max(abs(loss0), cfg.divergence_floor)

        elements = cfg.chains * cfg.draws * (n_x + n_y)
        online = cfg.online if cfg.online is not None else elements > cfg.max_traces_in_memory
        store = (
            _OnlineMoments(n_x, n_y, cfg.trace_dtype)
            if online
            else _TraceStore(cfg.chains, cfg.draws, n_x, n_y, cfg.trace_dtype)
        )
        loss_trace = torch.empty(cfg.chains, cfg.draws, dtype=torch.float64)
        obs_trace = torch.empty(cfg.chains, cfg.draws, dtype=torch.float64)
        drift = torch.empty(cfg.chains, cfg.draws, dtype=torch.float64)
        sgld_loss = torch.empty(cfg.chains, steps, dtype=torch.float64)
        half_eps, noise_scale = cfg.step_size / 2, math.sqrt(cfg.step_size)

        bar = tqdm(total=cfg.chains * steps, disable=not progress, desc="BIF sampling", unit="step")
        try:
            for chain in range(cfg.chains):
                snapshot.reset_to_anchor()
                seed = _chain_seed(cfg.seed, chain)
                generators: dict[torch.device, torch.Generator] = {}
                for p in sampled:
                    if p.device not in generators:
                        generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                cuda = sorted({p.device.index or 0 for p in sampled if p.device.type == "cuda"})
                with torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(seed)
                    batches = _cycle(train_loader)
                    for step in range(steps):
                        batch = next(batches)
                        with torch.enable_grad():
                            per_sample = loss_fn(model, batch)
                            if not isinstance(per_sample, torch.Tensor) or per_sample.dim() == 0:
                                raise ConfigurationError(
                                    "loss_fn must return per-sample losses [B] (reduction='none'), "
                                    f"got {'a scalar' if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__}."
                                )
                            if n_beta is None:
                                n_beta = _default_n_beta(per_sample.shape[0])
                            loss = per_sample.mean()
                            value = float(loss.detach())
                            sgld_loss[chain, step] = value
                            where = (f"burn-in step {step}" if step < burn_in
                                     else f"draw {(step - burn_in) // cfg.thin} (SGLD step {step})")
                            if not math.isfinite(value):
                                raise _diverged(chain, where, f"the minibatch loss is {value}", cfg, n_beta)
                            if value > limit:
                                raise _diverged(chain, where, f"the minibatch loss {value:.4g} exceeds "
                                                f"{cfg.divergence_factor:g} x the loss at w* ({limit:.4g})", cfg, n_beta)
                            grads = torch.autograd.grad(loss, sampled, allow_unused=True)
                        with torch.no_grad():
                            for p, g, w0 in zip(sampled, grads, snapshot.anchors):
                                force = (p - w0).mul_(cfg.gamma)
                                if g is not None:
                                    force.add_(g, alpha=n_beta)
                                p.add_(force, alpha=-half_eps)
                                noise = torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)
                                p.add_(noise, alpha=noise_scale)
                        bar.update(1)
                        offset = step - burn_in + 1
                        if offset <= 0 or offset % cfg.thin:
                            continue
                        draw = offset // cfg.thin - 1
                        where = f"draw {draw} (SGLD step {step})"
                        with torch.no_grad():
                            x = _evaluate(model, loss_fn, train_samples, cfg.eval_batch_size, "train_samples", True)
                            y = _evaluate(model, observable_fn, queries, cfg.eval_batch_size, "queries", False).reshape(-1)
                            dist = math.sqrt(sum(float(((p - w0).double() ** 2).sum()) for p, w0 in zip(sampled, snapshot.anchors)))
                        mean_x = float(x.double().mean())
                        if not (math.isfinite(mean_x) and math.isfinite(dist) and bool(torch.isfinite(y).all())):
                            raise _diverged(chain, where, "a traced loss, observable or parameter is NaN/inf", cfg, n_beta)
                        if mean_x > limit:
                            raise _diverged(chain, where, f"the mean traced loss {mean_x:.4g} exceeds "
                                            f"{cfg.divergence_factor:g} x the loss at w* ({limit:.4g})", cfg, n_beta)
                        store.add(chain, draw, (x - ref_x).cpu(), (y - ref_y).cpu())
                        loss_trace[chain, draw] = mean_x
                        obs_trace[chain, draw] = float(y.double().mean())
                        drift[chain, draw] = dist / anchor_norm
                        if draw % 50 == 0:
                            bar.set_postfix(chain=chain, loss=f"{mean_x:.4g}", drift=f"{dist / anchor_norm:.2e}")
        finally:
            bar.close()
    finally:
        snapshot.restore()

    cov, var_x, var_y = store.moments()
    denom = torch.sqrt(torch.outer(var_x, var_y))
    corr = torch.where(denom > 0, cov / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.full_like(cov, float("nan")))
    out_shape = (n_x,) + obs_shape
    bif = (-cov).reshape(out_shape)
    correlation = (-corr).reshape(out_shape)
    influence = bif * (n_beta / dataset_size) if dataset_size else None

    rhat_ps = ess_ps = None
    if isinstance(store, _TraceStore):
        rhat_ps = split_rhat(store.x)
        ess_ps = effective_sample_size(store.x)
    diagnostics = BIFDiagnostics(
        loss_trace=loss_trace,
        observable_trace=obs_trace,
        sgld_loss=sgld_loss,
        drift=drift,
        drift_fraction=float(drift.mean()),
        loss_at_optimum=loss0,
        rhat=float(split_rhat(loss_trace)),
        ess=float(effective_sample_size(loss_trace)),
        rhat_observable=float(split_rhat(obs_trace)),
        ess_observable=float(effective_sample_size(obs_trace)),
        rhat_per_sample=rhat_ps,
        ess_per_sample=ess_ps,
    )
    return BIFResult(
        bif=bif,
        correlation=correlation,
        influence=influence,
        diagnostics=diagnostics,
        config=cfg,
        n_beta=float(n_beta),
        dataset_size=dataset_size,
        n_draws=cfg.chains * cfg.draws,
        online=bool(online),
        seconds=time.perf_counter() - start,
    )


def _default_n_beta(batch_size: int) -> float:
    if batch_size < 2:
        raise ConfigurationError(
            f"n_beta=None needs a training batch size >= 2 (nβ = B/log B), got {batch_size}; set config.n_beta."
        )
    return batch_size / math.log(batch_size)


__all__ = [
    "BIFConfig",
    "BIFDiagnostics",
    "BIFResult",
    "bayesian_influence",
    "effective_sample_size",
    "rank_stability",
    "split_rhat",
]
