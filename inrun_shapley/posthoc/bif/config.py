"""Settings of the BIF sampler (:class:`BIFConfig`) and the call signatures it refers to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from inrun_shapley.errors import ConfigurationError

AUTO_ABLE = ("step_size", "thin")
"""Positive-number fields that also accept ``"auto"`` (gamma, draws, burn_in, control_variate are checked apart)."""

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``fn(model, batch) -> per-sample loss`` with ``reduction="none"``: shape ``[B]`` or ``[B, ...]``."""

ParamSelection = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool], None]
"""Parameter names (or module-name prefixes), or a predicate ``(name, param) -> bool``."""


@dataclass
class BIFConfig:
    """Settings of the SGLD sampler and of the covariance accumulation.

    Fields marked *auto* default to ``"auto"``: :func:`bayesian_influence` then sets them from the
    model's own measurements and a short pilot run (:mod:`~inrun_shapley.posthoc.bif.auto`: the
    rules, none of which looks at attribution quality), and records what it chose in
    :attr:`BIFResult.tuning`; any number given is used as is.

    Attributes:
        step_size: *auto*. SGLD step size ε (units of parameter² per unit of potential). Keep
            ``step_size * gamma`` ≲ 0.1 for small models; a larger ε mixes faster but biases the
            covariance by about ``ε·λ/4`` relative along an eigen-direction with posterior
            precision λ.
        n_beta: nβ, the inverse temperature times the dataset size, multiplying the *mean*
            training loss. ``None`` = ``B / log(B)`` with B the training batch size.
        gamma: *auto*. γ, strength of the localizing Gaussian ``γ/2·‖w − w*‖²`` (1 / parameter²).
        chains: C, number of independent chains, each started from w*.
        draws: *auto*. T, recorded draws per chain (after burn-in and thinning).
        burn_in: *auto*. SGLD steps discarded at the start of each chain; ``None`` = ``draws``.
        thin: *auto*. Record every ``thin``-th SGLD step after burn-in (steps per chain:
            ``burn_in + draws * thin``).
        budget_s: wall-clock seconds the whole call may take (measurements, pilot and
            sampling), used when ``draws`` is ``"auto"``; ``None`` = draw until about
            ``target_ess`` effective draws are pooled.
        target_ess: effective pooled draws aimed at when ``draws`` is ``"auto"`` and no budget is
            given.
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
        batched: run the C chains together, parameters stacked ``[C, ...]`` and vmapped
            (:mod:`~inrun_shapley.posthoc.bif.batched`; the same chains up to floating-point
            rounding; several times more draws per second on small models). ``False`` (default) =
            one chain after another; ``True`` = batched, or a ConfigurationError when the model
            cannot be vmapped; ``None`` = batched when the model evaluates the same under
            ``torch.func.vmap`` at w* (one extra call of each function) and all sampled parameters
            share one device, else one chain after another with a warning.
        control_variate: *auto* (``"diagonal"`` when its gradients fit in memory).
            ``None``, ``"prior"`` or ``"diagonal"``: subtract the zero-mean control
            variate of a coupled Gaussian chain driven by the same noise
            (:mod:`~inrun_shapley.posthoc.bif.control_variate`; unbiased, needs ``gamma > 0`` and
            per-sample gradients of every traced value at w*, ``(n_train + n_observables) × d``
            numbers).
    """

    step_size: Union[float, str] = "auto"
    n_beta: Optional[float] = None
    gamma: Union[float, str] = "auto"
    chains: int = 4
    draws: Union[int, str] = "auto"
    burn_in: Union[int, str, None] = "auto"
    thin: Union[int, str] = "auto"
    seed: int = 0
    dataset_size: Optional[int] = None
    params: ParamSelection = None
    eval_batch_size: Optional[int] = 1024
    online: Optional[bool] = None
    max_traces_in_memory: int = 100_000_000
    divergence_factor: float = 100.0
    divergence_floor: float = 1.0
    trace_dtype: torch.dtype = torch.float32
    batched: Optional[bool] = False
    control_variate: Optional[str] = "auto"
    budget_s: Optional[float] = None
    target_ess: int = 400

    def __post_init__(self) -> None:
        problems = []

        def positive(name: str, allow_none: bool = False, integer: bool = False) -> None:
            value = getattr(self, name)
            if (value is None and allow_none) or (value == "auto" and name in AUTO_ABLE):
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
        positive("budget_s", allow_none=True)
        positive("target_ess", integer=True)
        positive("max_traces_in_memory", integer=True)
        positive("divergence_factor")
        positive("divergence_floor")
        if self.gamma != "auto" and (not isinstance(self.gamma, (int, float)) or isinstance(self.gamma, bool)
                                     or not math.isfinite(self.gamma) or self.gamma < 0):
            problems.append(f"gamma must be 'auto' or a finite number >= 0, got {self.gamma!r}")
        if self.draws != "auto" and (not isinstance(self.draws, int) or self.draws < 4):
            problems.append(f"draws must be 'auto' or an integer >= 4 (split-R̂ needs two halves), got {self.draws!r}")
        if self.burn_in not in (None, "auto") and (not isinstance(self.burn_in, int) or self.burn_in < 0):
            problems.append(f"burn_in must be 'auto', None or an integer >= 0, got {self.burn_in!r}")
        if not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if self.online not in (None, True, False):
            problems.append(f"online must be None, True or False, got {self.online!r}")
        if self.batched not in (None, True, False):
            problems.append(f"batched must be None, True or False, got {self.batched!r}")
        if self.control_variate not in (None, "prior", "diagonal", "auto"):
            problems.append(f"control_variate must be 'auto', None, 'prior' or 'diagonal', got {self.control_variate!r}")
        if self.control_variate in ("prior", "diagonal") and self.gamma != "auto" and not self.gamma > 0:
            problems.append("control_variate needs gamma > 0 (the coupled chain needs a stationary law)")
        if not isinstance(self.trace_dtype, torch.dtype) or not self.trace_dtype.is_floating_point:
            problems.append(f"trace_dtype must be a floating torch.dtype, got {self.trace_dtype!r}")
        if problems:
            raise ConfigurationError("Invalid BIFConfig: " + "; ".join(problems) + ".")

    @property
    def resolved_burn_in(self) -> int:
        """Burn-in steps actually used (``draws`` when ``burn_in`` is None).

        Raises:
            ConfigurationError: a field it depends on is still ``"auto"``.
        """
        if "auto" in (self.burn_in, self.draws if self.burn_in is None else 0, self.thin):
            raise ConfigurationError("BIFConfig: burn_in, draws or thin is still 'auto'; bayesian_influence resolves "
                                     "them (see BIFResult.config for the values it chose).")
        return self.draws if self.burn_in is None else self.burn_in

    @property
    def steps_per_chain(self) -> int:
        """SGLD steps per chain: ``burn_in + draws * thin``."""
        return self.resolved_burn_in + self.draws * self.thin


def default_n_beta(batch_size: int) -> float:
    """Default nβ = B / log(B) for a training batch size B (the ``n_beta=None`` setting).

    Raises:
        ConfigurationError: ``batch_size < 2`` (log B would be 0 or undefined).
    """
    if batch_size < 2:
        raise ConfigurationError(
            f"n_beta=None needs a training batch size >= 2 (nβ = B/log B), got {batch_size}; set config.n_beta."
        )
    return batch_size / math.log(batch_size)


__all__ = ["BIFConfig", "LossFn", "ParamSelection", "default_n_beta"]


def checked_per_sample(per_sample: Any) -> torch.Tensor:
    """``per_sample`` if it is a ``[B]`` tensor of per-sample losses, else ConfigurationError."""
    if not isinstance(per_sample, torch.Tensor) or per_sample.dim() == 0:
        raise ConfigurationError(
            "loss_fn must return per-sample losses [B] (reduction='none'), "
            f"got {'a scalar' if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__}."
        )
    return per_sample
