"""``ShapleyTracker``: In-Run Data Shapley values at every optimizer step, for a plain PyTorch loop.

How it works (docs/math.md §2):

* module hooks capture, during the ordinary forward/backward of each micro-batch, each tracked
  layer's inputs ``a`` and output gradients ``b`` (no per-sample gradient is materialized;
  :mod:`~inrun_shapley.engine.capture_session`);
* the optimizer's step pre-hook (parameters still ``theta_t``) keeps what the step will read;
  the fixed-state estimators (``"shapley"``, ``"loo"``, ``"sgd"``) take the validation gradient
  ``g_v`` at ``theta_t`` there (:mod:`~inrun_shapley.engine.validation`: ``.grad`` and the
  parameters untouched);
* the step post-hook (fires only for steps that happened) reads the optimizer state, takes the
  default ``"midpoint"`` estimator's validation gradient at ``theta_t + Δ(G/2)``, forms the
  fixed direction ``M`` per parameter (:mod:`~inrun_shapley.engine.directions`), and computes each
  sample's value ``<M, c_i>`` through the capture rules (:mod:`~inrun_shapley.engine.scoring`).

Sign and units: a value is positive when the sample's presence in the step lowered the
validation loss; values include the learning rate, so they are in units of validation loss and
the values of one step sum to the linear part of that step's validation-loss change.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from inrun_shapley.engine.capture_session import CaptureSession
from inrun_shapley.engine.directions import Estimator
from inrun_shapley.engine.ids import as_sample_ids, sum_occurrences
from inrun_shapley.engine import sharding
from inrun_shapley.engine.scoring import grad_sq_norm, grads_zeroed, world_size
from inrun_shapley.engine.step_check import StepSumCheck, nonfinite_training_step
from inrun_shapley.engine.step import PreStep, StepPipeline, amp_scaling, stage
from inrun_shapley.engine.sinks import close_at_exit, close_sink
from inrun_shapley.engine.store import InMemoryValues
from inrun_shapley.engine.options import check_kernels, check_options
from inrun_shapley.engine.results import TrackerResults
from inrun_shapley.engine.tracked import (
    ModuleReport, plan_modules, plan_parameters, trained_signature, untracked_trained,
)
from inrun_shapley.data import default_loss, validation_rows
from inrun_shapley.engine.validation import ValidationObjective
from inrun_shapley.errors import ConfigurationError, NonFiniteError, SampleIdError
from inrun_shapley.optim import adapter_for, innermost_optimizer

__all__ = ["ESTIMATORS", "Estimator", "ModuleReport", "ShapleyTracker"]

ESTIMATORS = tuple(e.value for e in Estimator)


class ShapleyTracker(TrackerResults):
    """Attach to a model and its optimizer; get each training sample's In-Run Shapley value.

    Args:
        model: the ``nn.Module`` being trained (never modified: only hooks are added).
        optimizer: a ``torch.optim`` optimizer (or a framework wrapper of one) over the model's
            parameters: ``SGD``, ``Adam`` or ``AdamW`` (and subclasses).
        val_data: validation set (see :class:`~inrun_shapley.engine.validation.ValidationObjective`).
        val_loss_fn: ``fn(model, batch) -> per-sample losses [m]`` (or their mean); default
            :func:`inrun_shapley.data.default_loss` (cross-entropy / MSE on ``model(input)``).
        validation: a ready :class:`ValidationObjective` instead of ``val_data``/``val_loss_fn``.
        estimator: an :class:`Estimator` or its name: ``"midpoint"`` (default: the Shapley value
            of the step the optimizer really takes, validation gradient at ``θ_t + Δ(G/2)``;
            exact for quadratic games), ``"shapley"`` (fixed-state Shapley for the optimizer in
            use), ``"loo"`` (linearized leave-one-out of the real Adam step), or ``"sgd"``
            (gradient dot product times lr: the SGD-form baseline, whatever the optimizer).
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
            preconditioner on Linear weights; see :mod:`inrun_shapley.engine.queries`), or ``"auto"``
            (per layer, ghost where it is exact and cheaper by estimated FLOPs, decided at the
            first step). Other layers always take the exact path. The choice is in
            :attr:`query_plan`.
        sink: an extra receiver of per-step values with ``add_step(step, ids, values,
            group_values=None)`` (e.g. :class:`inrun_shapley.log.ShapleyLogWriter`, created with
            ``group_names=tracker.group_names`` when ``group_values``). The tracker closes it
            (``close()``, else ``flush()``) in :meth:`close` and at interpreter exit, so a
            writer given here needs no ``close()`` of its own. A step whose ids repeat
            (sampling with replacement) passes ``counts=`` (occurrences per id) as well.
        step_check: the per-step check that the values sum to the step's own first-order change
            (``"warn"``, ``"raise"`` or ``"off"``).
        kernels: how the midpoint's elementwise pass over the parameters runs: ``"foreach"``
            (default: list-wide ``torch._foreach_*`` kernels, 13 passes over memory for Adam) or
            ``"compiled"`` (one ``torch.compile``-generated kernel per param group reading each
            input once: faster every step, at a one-off compile of seconds to tens of seconds at
            the first step; needs a working ``torch.compile``, else it warns once and falls back
            to the list-wide kernels, with the same values).

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
        estimator: str | Estimator = "midpoint",
        order: int = 1,
        val_sample_size: int | None = None,
        val_batch_size: int = 256,
        seed: int = 0,
        group_values: bool = False,
        record_steps: bool = False,
        exclude: Iterable[str] = (),
        strict: bool = True,
        world_size: int | None = None,
        sink=None,
        per_query: bool = False,
        query_path: str = "auto",
        step_check: str = "warn",
        kernels: str = "foreach",
    ):
        estimator = Estimator.parse(estimator)
        check_kernels(kernels)
        check_options(estimator, order, per_query, query_path, val_sample_size, group_values=False)
        if validation is None:
            if val_data is None:
                raise ConfigurationError(
                    "the tracker needs a validation objective: pass val_data=... (and val_loss_fn=fn(model, "
                    "batch) -> per-sample losses unless inrun_shapley.data.default_loss fits), or validation=..."
                )
            validation = ValidationObjective(  # one default loss everywhere, as in the adapters
                validation_rows(val_data), val_loss_fn or default_loss,
                sample_size=val_sample_size, batch_size=val_batch_size, seed=seed,
            )
        check_options(estimator, order, per_query, query_path, None, group_values)
        self.model = model
        sharding.refuse_unsupported(model, optimizer)  # DeepSpeed ZeRO, FSDP1: say what to use instead
        self.optimizer = innermost_optimizer(optimizer)
        self.adapter = adapter_for(self.optimizer)
        self.validation = validation
        self.estimator = estimator
        self.order = order
        self.keep_group_values = group_values
        self.per_query = per_query
        self.query_path = query_path
        self.world_size = world_size
        self.store = InMemoryValues(record_steps=record_steps)
        self.step_check = StepSumCheck(step_check)
        self.kernels = kernels
        self.sink = sink
        self.step = 0  # real optimizer steps seen
        self.skipped_steps = 0  # micro-batch groups dropped because their step never happened
        self._grad_sq_after_backward = None  # |ḡ|² at the end of backward: a device tensor
        self._pre: PreStep | None = None  # the pre-hook's record of the step under way (None: scored)
        self._warned_no_backward_signal = False
        self._listeners: list = []

        self._exclude, self._strict, self._base_adapter = tuple(exclude), strict, self.adapter
        self._session: CaptureSession | None = None
        self._plan()
        self._handles = [self.optimizer.register_step_pre_hook(self._before_step),
                         self.optimizer.register_step_post_hook(self._after_step)]

    def _plan(self) -> None:
        """Plan the tracked modules and parameters from what the optimizer updates now: at
        construction, and again whenever that changes (parameters unfrozen with
        ``requires_grad_(True)``, ``optimizer.add_param_group``), checked at each micro-batch."""
        old = self._session
        modules, self._reports = plan_modules(self.model, self._exclude, self._strict, stacklevel=4)
        if old is not None and self.keep_group_values and list(modules) != list(self._modules):
            raise ConfigurationError(
                "group_values keep one column per tracked module, and the modules the optimizer trains changed "
                f"(now {list(modules)}): build the tracker once every module that will train is trainable, "
                "or drop group_values")
        self._modules = modules
        self._params, self._param_group, self.untracked_optimized = plan_parameters(
            self.model, self._modules, self.optimizer)
        self._trained = trained_signature(self.optimizer)
        self.sharded = sharding.is_sharded(self._params)  # FSDP2: DTensor handling in engine/sharding.py
        self.adapter, validation = self._base_adapter, self.validation
        if self.sharded:
            sharding.check_sharded(self._modules, per_query=self.per_query, order=self.order)
            self.adapter, validation = sharding.ShardedAdapter(self.adapter), sharding.ShardedValidation(validation)
        self._session = CaptureSession(self._modules)
        if old is not None:  # micro-batches captured before the change are still scored
            old.detach()
            self._session.pending = old.pending
        if self.sharded:
            self._session.unsharded = sharding.unsharded_lookup(self.model)
        self._pipeline = StepPipeline(
            self.model, self.optimizer, self.adapter, validation, self._modules, self._params, self._param_group,
            estimator=self.estimator, order=self.order, per_query=self.per_query, query_path=self.query_path,
            check=self.step_check, keep_groups=self.keep_group_values, sharded=self.sharded,
            fused=self.kernels == "compiled",
        )
        self._session.attach()

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
        self._session.detach()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self) -> None:
        """:meth:`detach`, then close the ``sink`` given to the tracker (a value log writer
        flushes, compacts and releases its lock). Idempotent; also run at interpreter exit."""
        self.detach()
        close_sink(self.sink)

    @property
    def sink(self):
        """The extra receiver of per-step values (see the constructor), or None."""
        return self._sink

    @sink.setter
    def sink(self, sink) -> None:
        self._sink = sink
        if sink is not None:
            close_at_exit(sink)

    def __enter__(self) -> "ShapleyTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- batches
    def begin_batch(self, ids) -> None:
        """Mark the start of a (micro-)batch whose rows have sample ids ``ids`` (one per row)."""
        ids = as_sample_ids(ids)
        self._session.end()
        if self._session.pending and (sharding.grads_zeroed(self._params, self._session.unsharded)  # FSDP2: and
                                      if self.sharded else grads_zeroed(self._params)):  # unreduced ones
            # The gradients were reset without a step: that step was skipped (e.g. GradScaler
            # found inf), so its micro-batches have no value.
            self._session.drop_pending()
            self.skipped_steps += 1
            self._grad_sq_after_backward = None
        if trained_signature(self.optimizer) != self._trained:
            self._plan()  # parameters started (or stopped) training since the last plan
        self._session.begin(ids)

    def after_backward(self) -> None:
        """Record the gradient norm right after backward (before unscaling and clipping).

        The ratio of the norm the optimizer finally uses to this one is the scalar that loss
        scaling and gradient clipping applied to every sample's contribution.
        """
        with stage("grad_norm"):
            self._grad_sq_after_backward = grad_sq_norm(self._params)

    def end_batch(self) -> None:
        """Mark the end of the open (micro-)batch; it is scored at the next optimizer step."""
        self._session.end()

    def new_accumulation_window(self) -> None:
        """Drop micro-batches whose step never happened (call when gradients are being zeroed).

        Frameworks that zero gradients after the forward of a micro-batch (Lightning) call this
        from their before-zero-grad event; the open micro-batch is kept.
        """
        if self._session.drop_pending():
            self.skipped_steps += 1

    @contextmanager
    def batch(self, ids):
        """Context manager around one micro-batch's forward **and backward**.

        Clip gradients and step after the block: the gradient norm is read at its exit, and the
        ratio of the norm the optimizer then uses to it is the clipping (and loss-scaling) factor
        applied to every sample's contribution. Gradients clipped *inside* the block are not
        seen as clipped: the values come out scaled up by the inverse of the clipping factor
        (×8–×64 in practice), which the step-sum check (``step_check``) reports.

        Args:
            ids: one integer sample id per row of the batch (tensor, array or list).
        """
        self.begin_batch(ids)
        try:
            yield self
        finally:
            self.after_backward()
            self.end_batch()

    def _suspend(self):
        """This tracker captures nothing inside the block (its own validation passes, replays)."""
        return self._session.suspend()

    # ------------------------------------------------------------ step hooks
    def _before_step(self, optimizer, args, kwargs):
        """Step pre-hook: parameters are still ``θ_t``. The pipeline's first stages need the
        step's final gradients: without a closure they are in ``.grad`` now; with one (Lightning's
        automatic optimization), the forward and backward run inside ``step()``, so the closure
        is wrapped and the stages run right after it, still before the optimizer's update."""
        for listener in self._listeners:
            if hasattr(listener, "before_step"):
                listener.before_step(self, self.step + 1)
        self._pre = None
        kwargs = dict(kwargs or {})
        grad_scale, _ = amp_scaling(optimizer, kwargs)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        if closure is None:
            self._run_before(grad_scale)
            return None

        def closure_then_stages():
            loss = closure()
            self._run_before(grad_scale)
            return loss

        if "closure" in kwargs:
            kwargs["closure"] = closure_then_stages
            return args, kwargs
        return (args[0], closure_then_stages, *args[2:]), kwargs

    def _run_before(self, grad_scale) -> None:
        with self._suspend():
            self._pre = self._pipeline.before(self.step + 1, self._session, grad_scale=grad_scale,
                                              need_norm=self._grad_sq_after_backward is not None,
                                              world_size=world_size(self.world_size))

    @property
    def query_plan(self):
        """Per-query values: which path each tracked layer takes (list of
        :class:`~inrun_shapley.engine.queries.PlanRow`), set at the first step; else None."""
        return self._pipeline.query_plan

    def _after_step(self, optimizer, args, kwargs) -> None:
        """Step post-hook: the step happened; score every sample of every micro-batch in it
        (:meth:`StepPipeline.after`: one read of the step's values and flags), then hand the
        values to the store, the sink and the listeners."""
        batches = self._session.step_batches()
        pre, self._pre = self._pre, None
        if not batches and pre is None:
            return  # the outer hook of a nested step() (a subclass calling super().step()): already scored
        if not batches:
            raise SampleIdError(
                "optimizer.step() ran but no batch was marked: wrap each micro-batch's forward and "
                "backward in `with tracker.batch(ids):` (one sample id per row)"
            )
        if pre is None:
            raise ConfigurationError("the optimizer's step post-hook ran without its pre-hook: the tracker "
                                     "cannot score this step (attach the tracker before calling step())")
        grad_scale, found_inf = amp_scaling(optimizer, kwargs or {})
        if self._grad_sq_after_backward is None and not self._warned_no_backward_signal:
            warnings.warn(
                "inrun-shapley saw no end-of-backward signal for this step (tracker.batch(...) "
                "exit or after_backward()); gradient clipping and loss scaling are not accounted for",
                stacklevel=3,
            )
            self._warned_no_backward_signal = True
        try:
            if trained_signature(self.optimizer) != self._trained:  # changed after this step's forward
                self.step_check.unvalued(self.step + 1, untracked_trained(self.model, self.optimizer, self._trained))
            with self._suspend():
                host = self._pipeline.after(
                    pre, self.step + 1, self._session, batches, grad_sq_backward=self._grad_sq_after_backward,
                    grad_scale=grad_scale, found_inf=found_inf,
                    world_size=world_size(self.world_size))
        except BaseException as exc:
            # a step that fails before its values are stored is not counted (``self.step`` stays) and
            # its captured batches are dropped, so the next step starts clean
            ids = [int(i) for b in batches for i in b.ids.tolist()]
            self._session.finish_step()
            self._grad_sq_after_backward = None
            if isinstance(exc, NonFiniteError):
                blame = nonfinite_training_step(self._params, self.step + 1, ids)
                if blame is not None:
                    raise blame from exc
            raise
        self._grad_sq_after_backward = None
        if host.skipped:  # a fused optimizer skipped this step internally (found_inf)
            self._session.finish_step()
            self.skipped_steps += 1
            return
        self.step += 1
        # sampling with replacement: one row per occurrence, summed per id (occurrences in ``counts``)
        ids, values, groups, occurrences = sum_occurrences(host.ids, host.values, host.groups)
        self.store.add_step(self.step, ids, values, groups, list(self._modules) if groups is not None else None,
                            counts=occurrences)
        if self.sink is not None:
            if occurrences is None:
                self.sink.add_step(self.step, ids, values, group_values=groups)
            else:  # only then: a sink without ``counts`` keeps working on unique ids
                self.sink.add_step(self.step, ids, values, group_values=groups, counts=occurrences)
        for listener in self._listeners:
            if hasattr(listener, "after_step"):
                listener.after_step(self, self.step, host.ids)  # the rows' ids, repeats kept
        self._session.finish_step()
