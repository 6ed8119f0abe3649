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

import time
import warnings
from typing import Any, Optional

import torch
from torch import nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif.auto import auto_fields, resolve
from inrun_shapley.posthoc.bif.batched import BatchedSGLDSampler
from inrun_shapley.posthoc.bif.config import BIFConfig, LossFn, ParamSelection, default_n_beta
from inrun_shapley.posthoc.bif.control_variate import CoupledGaussianCV
from inrun_shapley.posthoc.bif.diagnostics import BIFDiagnostics
from inrun_shapley.posthoc.bif.functional import FunctionalModel, per_sample_jacobian
from inrun_shapley.posthoc.bif.moments import TraceStore, covariance_and_correlation, make_store
from inrun_shapley.posthoc.bif.result import BIFResult
from inrun_shapley.posthoc.bif.sampler import ModelSnapshot, SGLDSampler, select_params


def _dataset_size(loader: Any) -> Optional[int]:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


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
        :class:`BIFResult` with ``bif`` of shape ``[n_train, n_queries, *token_shape]``; rank by
        ``result.helpfulness`` (numpy, positive = helpful: lowers the query loss by default,
        raises the named observable otherwise), the orientation of every score of the library.

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
    observable_named = observable_fn is not None
    observable_fn = loss_fn if observable_fn is None else observable_fn
    selected = select_params(model, params if params is not None else cfg.params)
    dataset_size = cfg.dataset_size if cfg.dataset_size is not None else _dataset_size(train_loader)
    n_beta = cfg.n_beta
    if n_beta is None:
        batch_size = getattr(train_loader, "batch_size", None)
        if batch_size is not None:
            n_beta = default_n_beta(batch_size)

    snapshot = ModelSnapshot(model, selected)
    control, tuning = None, None
    try:
        snapshot.enter_sampling_mode()
        if auto_fields(cfg):
            def sequential(c: BIFConfig) -> SGLDSampler:
                sampler = SGLDSampler(model, loss_fn, observable_fn, train_loader, train_samples, queries, c,
                                      snapshot, n_beta)
                sampler.measure_anchor()
                return sampler

            if n_beta is None:
                n_beta = _first_batch_n_beta(loss_fn, model, train_loader)
            cfg, tuning, grads = resolve(cfg, sequential, n_beta,
                                         lambda s, c, g: _control_variate(s, c, g, selected), start)
            snapshot.reset_to_anchor()
        else:
            grads = None
        args = (model, loss_fn, observable_fn, train_loader, train_samples, queries, cfg, snapshot, n_beta)
        sampler = _make_sampler(cfg, selected, args)
        if cfg.control_variate is not None:
            control, _ = _control_variate(sampler, cfg, grads, selected)
            sampler.control_variate = control
        n_x, n_y = sampler.ref_x.shape[0], sampler.ref_y.shape[0]
        elements = cfg.chains * cfg.draws * (n_x + n_y)
        online = cfg.online if cfg.online is not None else elements > cfg.max_traces_in_memory
        store = make_store(cfg.chains, cfg.draws, n_x, n_y, cfg.trace_dtype, online)
        sampling_start = time.perf_counter()
        traces = sampler.run(store, progress)
        sampling_seconds = time.perf_counter() - sampling_start
    finally:
        snapshot.restore()
    n_beta = sampler.n_beta

    cov, corr = covariance_and_correlation(store, None if control is None else control.correction())
    out_shape = (n_x,) + sampler.observable_shape
    bif = (-cov).reshape(out_shape)
    influence = bif * (n_beta / dataset_size) if dataset_size else None
    diagnostics = BIFDiagnostics.from_traces(
        loss_trace=traces.loss,
        observable_trace=traces.observable,
        sgld_loss=traces.sgld_loss,
        drift=traces.drift,
        loss_at_optimum=sampler.loss_at_optimum,
        sample_traces=store.x if isinstance(store, TraceStore) else None,
    )
    return BIFResult(
        bif=bif,
        correlation=(-corr).reshape(out_shape),
        influence=influence,
        diagnostics=diagnostics,
        config=cfg,
        n_beta=float(n_beta),
        dataset_size=dataset_size,
        n_draws=cfg.chains * cfg.draws,
        online=bool(online),
        seconds=time.perf_counter() - start,
        batched=isinstance(sampler, BatchedSGLDSampler),
        sampling_seconds=sampling_seconds,
        observable_named=observable_named,
        tuning=tuning,
    )


def _make_sampler(cfg: BIFConfig, selected: list, args: tuple) -> SGLDSampler:
    """The batched sampler when ``cfg.batched`` asks for it (and, for ``None``, when the model
    passes the vmap probe), else the sequential one; the anchor at w* is measured once."""
    sequential = SGLDSampler(*args)
    sequential.measure_anchor()
    if cfg.batched is False:
        return sequential
    devices = {p.device for _, p in selected}
    try:
        if len(devices) > 1:
            raise ConfigurationError("BIF batched=True needs every sampled parameter on one device; found "
                                     f"{sorted(map(str, devices))}. Set BIFConfig(batched=False).")
        batched = BatchedSGLDSampler(*args)
        batched.adopt_anchor(sequential)
        batched.probe()
        return batched
    except ConfigurationError as exc:
        if cfg.batched:
            raise
        warnings.warn(f"{exc} Running the chains one after another.", stacklevel=3)
        return sequential


def _first_batch_n_beta(loss_fn: LossFn, model: nn.Module, train_loader: Any) -> float:
    """The default nβ = B/log B from the size of the first training batch."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return default_n_beta(len(loss_fn(model, next(iter(train_loader)))))


def _control_variate(sampler: SGLDSampler, cfg: BIFConfig, grads: Optional[tuple], selected: list) -> tuple:
    """``(control variate, (grad_x, grad_y))``: the coupled-chain control variate, with the
    per-sample gradients of every traced value at w* (computed unless ``grads`` are given)."""
    if grads is None:
        names = [n for n, _ in selected]
        functional = FunctionalModel(sampler.model, names)
        anchor = dict(zip(names, sampler.snapshot.anchors))
        size = cfg.eval_batch_size
        grads = (per_sample_jacobian(functional, sampler.loss_fn, anchor, sampler.train_samples, size,
                                     "train_samples", True),
                 per_sample_jacobian(functional, sampler.observable_fn, anchor, sampler.queries, size,
                                     "queries", False))
    if sampler.n_beta is None:
        sampler.n_beta = _first_batch_n_beta(sampler.loss_fn, sampler.model, sampler.train_loader)
    control = CoupledGaussianCV(cfg.control_variate, grads[0], grads[1], cfg.chains, cfg.step_size, cfg.gamma,
                                sampler.n_beta)
    return control, grads


__all__ = ["bayesian_influence"]
