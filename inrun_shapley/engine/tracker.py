"""``ShapleyTracker``: In-Run Data Shapley values at every optimizer step, for a plain PyTorch loop.

How it works (DESIGN.md §2):

* module hooks capture, during the ordinary forward/backward of each micro-batch, each tracked
  layer's inputs ``a`` and output gradients ``b`` (no per-sample gradient is materialized);
* the optimizer's step pre-hook (parameters still ``theta_t``) takes the validation gradient
  ``g_v`` with ``torch.autograd.grad`` (``.grad`` untouched, capture suspended);
* the step post-hook (fires only for steps that happened) reads the optimizer state, forms the
  fixed direction ``M = sign·lr·k·P ⊙ g_v`` per parameter (second order: ``P ⊙ (g_v + H_v u)``),
  and computes each sample's value ``<M, c_i>`` through the capture rules.

Sign and units: a value is positive when the sample's presence in the step lowered the
validation loss; values include the learning rate, so they are in units of validation loss and
the values of one step sum to the linear part of that step's validation-loss change.
"""

from __future__ import annotations

import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.capture import JVP_RULE, Capture, CaptureRule, rule_for
from inrun_shapley.capture.jvp import _tensor_outputs
from inrun_shapley.capture.registry import up
from inrun_shapley.errors import (
    ConfigurationError,
    NonFiniteError,
    SampleIdError,
    UnsupportedModuleError,
)
from inrun_shapley.engine.ghost import QUERY_PATHS, GhostQueries, plan_query_path
from inrun_shapley.optim import adapter_for, innermost_optimizer
from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.engine.validation import ValidationObjective

ESTIMATORS = ("shapley", "loo", "sgd")


class _Suspension(threading.local):
    depth = 0


_SUSPENDED = _Suspension()


@dataclass
class ModuleReport:
    """One row of :meth:`ShapleyTracker.report`: how a module with trainable parameters is handled."""

    name: str
    type: str
    rule: str
    parameters: list[str]
    status: str  # "tracked", "excluded", or "unsupported: <reason>"


@dataclass
class _MicroBatch:
    ids: Tensor  # [n] int64 (CPU)
    captures: dict[str, list[Capture]] = field(default_factory=dict)


def _detach(x):
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _as_ids(ids) -> Tensor:
    if ids is None:
        raise SampleIdError(
            "no sample ids for this batch: pass one integer id per row, e.g. "
            "tracker.batch(batch['index']) (wrap your dataset with inrun_shapley.IndexedDataset to get them)"
        )
    t = torch.as_tensor(np.asarray(ids.detach().cpu() if isinstance(ids, Tensor) else ids))
    if t.dim() != 1:
        raise SampleIdError(f"sample ids must be a 1-D sequence with one id per row, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise SampleIdError("the batch has no sample ids (empty)")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise SampleIdError(f"sample ids must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if (t < 0).any():
        raise SampleIdError(f"sample ids must be non-negative, got {t[t < 0][:5].tolist()}")
    if t.unique().numel() != t.numel():
        dup = t[torch.unique(t, return_counts=True)[1].gt(1).nonzero()].flatten()[:5].tolist()
        raise SampleIdError(f"duplicate sample ids in one batch: {dup}; each row needs its own id")
    return t


class ShapleyTracker:
    """Attach to a model and its optimizer; get each training sample's In-Run Shapley value.

    Args:
        model: the ``nn.Module`` being trained (never modified: only hooks are added).
        optimizer: a ``torch.optim`` optimizer (or a framework wrapper of one) over the model's
            parameters: ``SGD``, ``Adam`` or ``AdamW`` (and subclasses).
        val_data: validation set (see :class:`~inrun_shapley.engine.validation.ValidationObjective`).
        val_loss_fn: ``fn(model, batch) -> per-sample losses [m]`` (or their mean).
        validation: a ready :class:`ValidationObjective` instead of ``val_data``/``val_loss_fn``.
        estimator: ``"shapley"`` (fixed-state Shapley for the optimizer in use, default),
            ``"loo"`` (linearized leave-one-out of the real Adam step), or ``"sgd"`` (gradient dot
            product times lr: the SGD-form baseline, whatever the optimizer).
        order: 1, or 2 for the second-order Shapley value (one validation Hessian-vector
            product per step; ``estimator="shapley"`` only).
        val_sample_size: validation rows drawn per step (None: the whole set every step).
        val_batch_size: rows per validation forward pass.
        seed: seed of the validation sampling.
        group_values: also keep the values split per tracked module (``tracker.group_values``).
        record_steps: keep every (step, id, value) record in memory.
        exclude: names (or name prefixes) of modules whose parameters are left out of the values.
        strict: raise on modules that cannot be tracked; if False they are excluded with one
            warning that names them.
        world_size: number of data-parallel ranks averaging gradients (default: the initialized
            ``torch.distributed`` world size, else 1).
        per_query: score every sample against every validation row separately (the rows are the
            queries; ``val_loss_fn`` returns ``[m]`` per-row or ``[m, T]`` per-token losses, a
            query per row or per token): values become ``[n, Q]`` (estimators ``shapley`` at first
            or second order, ``loo``, ``sgd``). Cost grows with Q: one direction per query (second
            order: plus one batched Hessian-vector product over the queries).
        query_path: how per-query values are computed for Linear and Embedding layers:
            ``"exact"`` (one direction per query through the capture rules), ``"ghost"``
            (pairwise ghost dot products with the query samples' captures, no per-query
            gradient; exact under SGD and the ``sgd`` estimator, a rank-1 approximation of Adam's
            preconditioner on Linear weights; see :mod:`inrun_shapley.engine.ghost`), or ``"auto"``
            (per layer, ghost where it is exact and cheaper by estimated FLOPs, decided at the
            first step). Other layers always take the exact path. The choice is in
            :attr:`query_plan`.
        sink: an extra receiver of per-step values with ``add_step(step, ids, values,
            group_values=None)`` (e.g. :class:`inrun_shapley.log.ShapleyLogWriter`, created with
            ``group_names=tracker.group_names`` when ``group_values``).

    Raises:
        UnsupportedOptimizerError: the optimizer has no adapter.
        UnsupportedModuleError: a module cannot be tracked (listed with the reason) and strict.
        ConfigurationError: invalid arguments.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from inrun_shapley import ShapleyTracker
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> val = (torch.randn(4, 4), torch.randn(4, 1))
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1)
        >>> tracker = ShapleyTracker(model, opt, val_data=val, val_loss_fn=loss_fn)
        >>> with tracker.batch(ids=torch.arange(8)):
        ...     ((model(x) - y) ** 2).mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> tracker.values.shape
        (8,)
        >>> tracker.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        *,
        val_data=None,
        val_loss_fn: Callable | None = None,
        validation: ValidationObjective | None = None,
        estimator: str = "shapley",
        order: int = 1,
        val_sample_size: int | None = None,
        val_batch_size: int = 256,
        seed: int = 0,
        group_values: bool = False,
        record_steps: bool = True,
        exclude: Iterable[str] = (),
        strict: bool = True,
        world_size: int | None = None,
        sink=None,
        per_query: bool = False,
        query_path: str = "auto",
    ):
        if estimator not in ESTIMATORS:
            raise ConfigurationError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if order not in (1, 2):
            raise ConfigurationError(f"order must be 1 or 2, got {order!r}")
        if order == 2 and estimator != "shapley":
            raise ConfigurationError("order=2 is defined for estimator='shapley' only")
        if per_query and order == 2 and query_path == "ghost":
            raise ConfigurationError("second-order per-query values take the exact path: use query_path='exact' or 'auto'")
        if per_query and val_sample_size is not None:
            raise ConfigurationError("per_query values use every query at every step: leave val_sample_size=None")
        if query_path not in QUERY_PATHS:
            raise ConfigurationError(f"query_path must be one of {QUERY_PATHS}, got {query_path!r}")
        if query_path != "auto" and not per_query:
            raise ConfigurationError("query_path applies to per-query values: pass per_query=True")
        if query_path == "ghost" and estimator == "loo":
            raise ConfigurationError(
                "the ghost path has no form for the 'loo' estimator (its Jacobian changes sign): "
                "use query_path='exact' or 'auto'"
            )
        if validation is None:
            if val_data is None or val_loss_fn is None:
                raise ConfigurationError(
                    "the tracker needs a validation objective: pass val_data=... and "
                    "val_loss_fn=fn(model, batch) -> per-sample losses (or validation=ValidationObjective(...))"
                )
            validation = ValidationObjective(
                val_data, val_loss_fn, sample_size=val_sample_size, batch_size=val_batch_size, seed=seed
            )
        self.model = model
        self.optimizer = innermost_optimizer(optimizer)
        self.adapter = adapter_for(self.optimizer)
        self.validation = validation
        self.estimator = estimator
        self.order = order
        self.keep_group_values = group_values
        self.per_query = per_query
        self.query_path = query_path
        self.query_plan = None  # list of ghost.PlanRow, set at the first per-query step
        self._ghost: GhostQueries | None = None
        if per_query and group_values:
            raise ConfigurationError("group_values are kept for the mean validation loss only (per_query=False)")
        self.world_size = world_size
        self.store = InMemoryValues(record_steps=record_steps)
        self.sink = sink
        self.step = 0  # real optimizer steps seen
        self.skipped_steps = 0  # micro-batch groups dropped because their step never happened
        self._exclude = tuple(exclude)
        self._open: _MicroBatch | None = None
        self._open_consumed = False
        self._pending: list[_MicroBatch] = []
        self._grad_sq_after_backward: float | None = None
        self._warned_no_backward_signal = False
        self._val_grads: list[Tensor] | None = None
        self._theta_before: list[Tensor] | None = None
        self._before: list[dict] = []
        self._module_theta: dict[str, dict[str, Tensor]] = {}
        self._handles: list = []
        self._listeners: list = []

        self._modules: dict[str, tuple[nn.Module, CaptureRule, dict[str, nn.Parameter]]] = {}
        self._reports: list[ModuleReport] = []
        self._plan_modules(strict)
        self._plan_parameters()
        self._attach()

    # ------------------------------------------------------------------ setup
    def _plan_modules(self, strict: bool) -> None:
        owned: set[str] = set()
        problems = []
        for name, module in self.model.named_modules():
            if any(name == o or name.startswith(o + ".") for o in owned):
                continue
            rule = rule_for(module) or JVP_RULE
            params = rule.parameters(module)
            if not params:
                continue
            kind = rule.kind
            if any(name == e or name.startswith(e + ".") for e in self._exclude):
                self._reports.append(ModuleReport(name, type(module).__name__, kind, list(params), "excluded"))
                continue
            reason = rule.check(module)
            if reason:
                problems.append((name, type(module).__name__, reason))
                self._reports.append(
                    ModuleReport(name, type(module).__name__, kind, list(params), f"unsupported: {reason}")
                )
                continue
            self._modules[name] = (module, rule, params)
            self._reports.append(ModuleReport(name, type(module).__name__, kind, list(params), "tracked"))
            if rule.owns_children:
                owned.add(name)
        if problems:
            lines = "\n".join(f"  - {n or '<root>'} ({t}): {r}" for n, t, r in problems)
            if strict:
                raise UnsupportedModuleError(
                    f"{len(problems)} module(s) cannot be tracked:\n{lines}\n"
                    "Fix them, or pass exclude=[names] (or strict=False) to leave their parameters out."
                )
            warnings.warn(f"inrun-shapley leaves these modules' parameters out of the values:\n{lines}", stacklevel=3)
        if not self._modules:
            raise UnsupportedModuleError("the model has no trainable parameters that can be tracked")

    def _plan_parameters(self) -> None:
        in_optimizer = {}
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                in_optimizer[id(p)] = gi
        self._params: list[nn.Parameter] = []
        self._param_group: list[int] = []
        index: dict[int, int] = {}
        for name, (module, rule, params) in self._modules.items():
            for pname, p in params.items():
                if id(p) not in index and id(p) in in_optimizer:
                    index[id(p)] = len(self._params)
                    self._params.append(p)
                    self._param_group.append(in_optimizer[id(p)])
        self._param_index = index
        tracked = set(index)
        self.untracked_optimized = [
            n for n, p in self.model.named_parameters() if id(p) in in_optimizer and id(p) not in tracked
        ]
        if not self._params:
            raise ConfigurationError("none of the model's tracked parameters is in the optimizer")

    def _attach(self) -> None:
        for name, (module, rule, _) in self._modules.items():
            if rule.needs_rng:
                self._handles.append(module.register_forward_pre_hook(partial(self._save_rng, name)))
            self._handles.append(module.register_forward_hook(partial(self._capture, name), with_kwargs=True))
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        self._rng_states: dict[str, Any] = {}

    def add_step_listener(self, listener) -> None:
        """Register an object told about every real optimizer step (e.g. a trajectory recorder).

        ``listener.before_step(tracker, step)`` runs in the step pre-hook (parameters are still
        theta_step; ``.grad`` may not be final yet), and ``listener.after_step(tracker, step, ids)``
        in the post-hook after the values were computed (parameters are theta_{step+1},
        ``p.grad`` is the gradient the optimizer used, the optimizer state is updated; ``ids`` are
        the sample ids of the step, in the order of :meth:`step_values`). Either method may be
        missing.
        """
        self._listeners.append(listener)

    def detach(self) -> None:
        """Remove every hook this tracker added (the model and optimizer are as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    close = detach

    def __enter__(self) -> "ShapleyTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -------------------------------------------------------------- batches
    def begin_batch(self, ids) -> None:
        """Mark the start of a (micro-)batch whose rows have sample ids ``ids`` (one per row)."""
        ids = _as_ids(ids)
        if self._open is not None:
            self.end_batch()
        if self._pending and self._grads_zeroed():
            # The gradients were reset without a step: that step was skipped (e.g. GradScaler
            # found inf), so its micro-batches have no value.
            self._pending.clear()
            self.skipped_steps += 1
            self._grad_sq_after_backward = None
        seen = torch.cat([mb.ids for mb in self._pending]) if self._pending else None
        if seen is not None:
            both = torch.cat([seen, ids])
            if both.unique().numel() != both.numel():
                dup = sorted(set(seen.tolist()) & set(ids.tolist()))[:5]
                raise SampleIdError(
                    f"sample ids {dup} appear twice in one optimizer step (across micro-batches); "
                    "each sample may appear once per step"
                )
        self._open = _MicroBatch(ids)
        self._open_consumed = False

    def after_backward(self) -> None:
        """Record the gradient norm right after backward (before unscaling and clipping).

        The ratio of the norm the optimizer finally uses to this one is the scalar that loss
        scaling and gradient clipping applied to every sample's contribution.
        """
        self._grad_sq_after_backward = self._grad_sq_norm()

    def end_batch(self) -> None:
        """Mark the end of the open (micro-)batch; it is scored at the next optimizer step."""
        mb = self._open
        if mb is not None and not self._open_consumed:
            if any(c.complete for caps in mb.captures.values() for c in caps):
                self._pending.append(mb)
            # else: no gradient reached any tracked layer (no backward, or the loss was skipped)
        self._open = None

    def new_accumulation_window(self) -> None:
        """Drop micro-batches whose step never happened (call when gradients are being zeroed).

        Frameworks that zero gradients after the forward of a micro-batch (Lightning) call this
        from their before-zero-grad event; the open micro-batch is kept.
        """
        if self._pending:
            self._pending.clear()
            self.skipped_steps += 1

    @contextmanager
    def batch(self, ids):
        """Context manager around one micro-batch's forward **and backward**.

        Clip gradients and step after the block: the gradient norm is read at its exit.

        Args:
            ids: one integer sample id per row of the batch (tensor, array or list).
        """
        self.begin_batch(ids)
        try:
            yield self
        finally:
            self.after_backward()
            self.end_batch()

    # ---------------------------------------------------------------- hooks
    def _capturing(self) -> bool:
        return self._open is not None and _SUSPENDED.depth == 0 and torch.is_grad_enabled()

    @contextmanager
    def _suspend(self):
        """No tracker captures while any tracker runs its own passes (validation, replays):
        several trackers may watch the same model (e.g. two estimators side by side)."""
        _SUSPENDED.depth += 1
        try:
            yield
        finally:
            _SUSPENDED.depth -= 1

    def _save_rng(self, name: str, module, args) -> None:
        if self._capturing():
            cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self._rng_states[name] = (torch.get_rng_state(), cuda)

    def _capture(self, name: str, module, args, kwargs, output) -> None:
        if not self._capturing():
            return
        _, rule, _ = self._modules[name]
        reason = rule.check(module)
        if reason:
            raise UnsupportedModuleError(f"module {name!r} ({type(module).__name__}): {reason}")
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            first = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        n_ids = self._open.ids.numel()
        rows = first.shape[0] if first is not None and first.dim() > 0 else None
        if rows is None or rows % n_ids != 0:
            raise SampleIdError(
                f"module {name!r} ({type(module).__name__}) was called on an input with first dimension "
                f"{rows}, but the batch has {n_ids} sample ids. The tracker needs the sample dimension "
                "first (or samples flattened sample-major into it): give one id per row of the batch"
            )
        try:
            outputs = _tensor_outputs(output)
        except TypeError as err:
            raise UnsupportedModuleError(f"module {name!r} ({type(module).__name__}): {err}") from None
        cap = Capture(args=_detach(args), kwargs=_detach(kwargs), rng_state=self._rng_states.pop(name, None))
        cap.grad_outputs = [None] * len(outputs)
        for j, out in enumerate(outputs):
            if out is not None and out.requires_grad:
                out.register_hook(partial(self._store_grad, cap, j))
        self._open.captures.setdefault(name, []).append(cap)

    @staticmethod
    def _store_grad(cap: Capture, j: int, grad: Tensor) -> None:
        prev = cap.grad_outputs[j]
        cap.grad_outputs[j] = grad.detach() if prev is None else prev + grad.detach()

    def _grad_sq_norm(self) -> float:
        squares = [up(p.grad.detach()).pow(2).sum() for p in self._params if p.grad is not None]
        if not squares:
            return 0.0
        device = squares[0].device  # one host sync for all parameters (model-parallel safe)
        return float(sum(s.to(device, torch.float64) for s in squares))

    def _grads_zeroed(self) -> bool:
        grads = [p.grad for p in self._params]
        if all(g is None for g in grads):
            return True
        return all(g is None or not bool(g.any()) for g in grads)

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: parameters are still theta_t. Never reads ``.grad``."""
        for listener in self._listeners:
            if hasattr(listener, "before_step"):
                listener.before_step(self, self.step + 1)
        state = self.optimizer.state
        self._before = [
            self.adapter.before_step(self.optimizer.param_groups[g], state.get(p, {}))
            for p, g in zip(self._params, self._param_group)
        ]
        self._module_theta = {
            name: {pn: p.detach().clone() for pn, p in params.items()}
            for name, (_, rule, params) in self._modules.items()
            if rule.reads_parameters
        }
        if self.order == 2 or self.estimator == "loo":  # drift / L2 decay terms need theta_t
            self._theta_before = [p.detach().clone() for p in self._params]
        if self.order == 2:
            self._val_grads = None  # taken with the Hessian-vector product after the step
        else:
            with self._suspend():
                if self.per_query:
                    self._val_grads = self._query_gradients()
                else:
                    self._val_grads, _ = self.validation.gradient(self.model, self._params, self.step + 1)

    def _query_gradients(self) -> list:
        """Per-query validation gradients; with ghost-path layers, their parameters get None and
        ``self._ghost`` holds the query captures taken in the same pass."""
        if self.query_plan is None:
            batches = self._pending + ([self._open] if self._open is not None else [])
            positions = {}
            for mb in batches:
                for name, caps in mb.captures.items():
                    for cap in caps:
                        x = cap.args[0] if cap.args and isinstance(cap.args[0], Tensor) else None
                        if x is not None and x.dim() > 0:
                            per = x.numel() if x.dtype in (torch.int64, torch.int32) else x.numel() // x.shape[-1]
                            positions[name] = positions.get(name, 0) + per
            self.query_plan = plan_query_path(
                self.query_path, self._modules, estimator=self.estimator, validation=self.validation,
                model=self.model, preconditioned=self.adapter.name != "sgd" and self.estimator == "shapley",
                train_positions=positions or None,
            )
        ghost_names = [row.module for row in self.query_plan if row.path == "ghost"]
        if not ghost_names:
            self._ghost = None
            return self.validation.query_gradients(self.model, self._params)
        self._ghost = GhostQueries({name: self._modules[name][0] for name in ghost_names})
        exact = [i for i, p in enumerate(self._params) if id(p) not in self._ghost.param_ids]
        grads = self.validation.query_gradients(self.model, [self._params[i] for i in exact], ghost=self._ghost)
        out: list = [None] * len(self._params)
        for i, g in zip(exact, grads):
            out[i] = g
        return out

    def _after_step(self, optimizer, args, kwargs) -> None:
        """Step post-hook: the step happened; score every sample of every micro-batch in it."""
        found_inf = kwargs.get("found_inf") if kwargs else None
        if found_inf is not None and bool(torch.as_tensor(found_inf).sum() > 0):
            self._pending.clear()  # a fused optimizer skipped this step internally
            self._consume_open()
            return
        batches = self._pending + ([self._open] if self._open is not None and not self._open_consumed else [])
        if not batches:
            raise SampleIdError(
                "optimizer.step() ran but no batch was marked: wrap each micro-batch's forward and "
                "backward in `with tracker.batch(ids):` (one sample id per row)"
            )
        self.step += 1
        scale = self._gradient_scale(kwargs)
        directions = self._directions()
        ids, values, groups = self._score(batches, directions)
        values *= scale
        if groups is not None:
            groups *= scale
        if not np.isfinite(values).all():
            raise NonFiniteError(
                f"step {self.step}: {int((~np.isfinite(values)).sum())} sample value(s) are NaN or "
                "infinite: the training loss or its gradients were not finite (lower the learning "
                "rate, check the data, or use a GradScaler that skips such steps)"
            )
        names = list(self._modules) if groups is not None else None
        self.store.add_step(self.step, ids, values, groups, names)
        if self.sink is not None:
            self.sink.add_step(self.step, ids, values, group_values=groups)
        for listener in self._listeners:
            if hasattr(listener, "after_step"):
                listener.after_step(self, self.step, ids)
        self._pending.clear()
        self._consume_open()
        self._grad_sq_after_backward = None
        self._val_grads = None
        self._theta_before = None
        self._ghost = None

    def _consume_open(self) -> None:
        if self._open is not None:
            self._open_consumed = True

    # -------------------------------------------------------------- scoring
    def _gradient_scale(self, kwargs) -> float:
        """Scalar between captured contributions and the gradient the optimizer used."""
        world = self.world_size
        if world is None:
            world = (
                torch.distributed.get_world_size()
                if torch.distributed.is_available() and torch.distributed.is_initialized()
                else 1
            )
        before = self._grad_sq_after_backward
        if before is None:
            if not self._warned_no_backward_signal:
                warnings.warn(
                    "inrun-shapley saw no end-of-backward signal for this step (tracker.batch(...) "
                    "exit or after_backward()); gradient clipping and loss scaling are not accounted for",
                    stacklevel=4,
                )
                self._warned_no_backward_signal = True
            ratio = 1.0
        else:
            after = self._grad_sq_norm()
            ratio = math.sqrt(after / before) if before > 0 else 0.0
        grad_scale = kwargs.get("grad_scale") if kwargs else None
        if grad_scale is not None:  # fused optimizers unscale inside the kernel
            ratio /= float(torch.as_tensor(grad_scale).float())
        return ratio / world

    def _directions(self) -> dict[int, Tensor]:
        """Per tracked parameter (by id), the directions ``M`` as ``[Q, *shape]`` (Q = 1 unless
        per_query), in the compute dtype."""
        groups = self.optimizer.param_groups
        state = self.optimizer.state
        grads = [None if p.grad is None else up(p.grad.detach()) for p in self._params]
        terms = []
        for i, p in enumerate(self._params):
            if grads[i] is None or p not in state and self.adapter.name != "sgd":
                terms.append(None)
                continue
            theta = up(self._theta_before[i]) if self._theta_before is not None else None
            terms.append(
                self.adapter.terms(
                    grads[i], groups[self._param_group[i]], state.get(p, {}), self._before[i] if self._before else {},
                    theta, need_drift=self.order == 2, need_loo=self.estimator == "loo",
                )
            )
        if self.order == 2:
            val_grads, hvp = self._second_order_terms(terms, grads)
        else:
            val_grads, hvp = self._val_grads, None
        directions = {}
        for i, (p, t) in enumerate(zip(self._params, terms)):
            if t is None:
                continue
            g = val_grads[i]
            if g is None:  # a ghost-path parameter: scored from the query captures
                continue
            if self.estimator == "sgd":
                m = t.sign * t.lr * g
            elif self.estimator == "loo":
                j = t.loo_precond if t.loo_precond is not None else (
                    t.coeff * t.precond if t.precond is not None else torch.full_like(g, t.coeff)
                )
                m = t.sign * t.lr * j * g
            else:
                if hvp is not None:
                    g = g + hvp[i]
                scale = t.sign * t.lr * t.coeff
                # same operations and rounding as scale * (precond * g), one new buffer; never
                # in place on precond (an adapter may hand back optimizer state)
                m = scale * g if t.precond is None else torch.mul(t.precond, g).mul_(scale)
            directions[id(p)] = m if self.per_query else m.unsqueeze(0)
        if self.per_query and self._ghost is not None:
            self._ghost.prepare({id(p): t for p, t in zip(self._params, terms)}, self.estimator)
        return directions

    def _second_order_terms(self, terms, grads):
        """``g_v`` and ``H_v u`` at theta_t, with ``u = d0 + ½ Σ_j δ_j`` (DESIGN.md §2)."""
        u = []
        for t, g, p in zip(terms, grads, self._params):
            if t is None:
                u.append(up(torch.zeros_like(p)))
                continue
            step_part = t.sign * t.lr * t.coeff * (t.precond * g if t.precond is not None else g)
            u.append(t.drift - 0.5 * step_part)
        theta_after = [p.detach().clone() for p in self._params]
        try:
            with torch.no_grad():
                for p, th in zip(self._params, self._theta_before):
                    p.copy_(th)
            with self._suspend():
                if self.per_query:  # H_q u for every query q (u is shared)
                    return self.validation.query_gradients(self.model, self._params, hvp_vectors=u)
                return self.validation.gradient(self.model, self._params, self.step, hvp_vectors=u)
        finally:
            with torch.no_grad():
                for p, th in zip(self._params, theta_after):
                    p.copy_(th)

    def _score(self, batches: Sequence[_MicroBatch], directions: dict[int, Tensor]):
        all_ids, all_vals, all_groups = [], [], []
        names = list(self._modules)
        with torch.no_grad(), self._suspend():
            for mb in batches:
                n = mb.ids.numel()
                device = self._params[0].device
                dtype = up(self._params[0].detach()).dtype
                n_dirs = next(iter(directions.values())).shape[0] if directions else self._ghost.n_queries
                vals = torch.zeros(n, n_dirs, dtype=dtype, device=device)
                group = torch.zeros(n, len(names), dtype=dtype, device=device) if self.keep_group_values else None
                for j, name in enumerate(names):
                    caps = mb.captures.get(name)
                    if not caps:
                        continue
                    module, rule, params = self._modules[name]
                    if self.per_query and self._ghost is not None and name in self._ghost.modules:
                        for cap in caps:
                            if cap.complete:
                                vals += self._ghost.dot(name, cap, n)
                        continue
                    dirs = {pn: directions[id(p)] for pn, p in params.items() if id(p) in directions}
                    if not dirs:
                        continue
                    for cap in caps:
                        if not cap.complete:
                            continue
                        per_row = rule.dot(module, cap, dirs, self._module_theta.get(name))  # [rows, Q]
                        per_sample = per_row.reshape(n, -1, per_row.shape[-1]).sum(1)  # [n, Q]
                        vals += per_sample
                        if group is not None:
                            group[:, j] += per_sample[:, 0]
                all_ids.append(mb.ids.numpy())
                all_vals.append((vals if self.per_query else vals[:, 0]).double().cpu().numpy())
                if group is not None:
                    all_groups.append(group.double().cpu().numpy())
        ids = np.concatenate(all_ids)
        vals = np.concatenate(all_vals)
        groups = np.concatenate(all_groups) if all_groups else None
        return ids, vals, groups

    # -------------------------------------------------------------- results
    @property
    def values(self) -> np.ndarray:
        """``[max_id + 1]`` run values (sum over steps); 0 for ids never seen."""
        return self.store.values

    @property
    def counts(self) -> np.ndarray:
        """``[max_id + 1]`` number of steps each id took part in."""
        return self.store.counts

    @property
    def group_values(self) -> np.ndarray | None:
        """``[max_id + 1, G]`` values split per tracked module (``group_names``), or None."""
        return self.store.group_values

    @property
    def group_names(self) -> list[str]:
        """Names of the groups of :attr:`group_values` (tracked modules, qualified names)."""
        return list(self._modules)

    def step_values(self) -> dict[str, np.ndarray]:
        """Every per-step record as flat arrays ``step``, ``id``, ``value``."""
        return self.store.step_table()

    def report(self) -> list[ModuleReport]:
        """How each module with trainable parameters is handled (tracked, excluded, unsupported)."""
        return list(self._reports)

    def state_dict(self) -> dict:
        """Small resumable state: the step counter and the in-memory values."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "values": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.store.load_state_dict(state["values"])
