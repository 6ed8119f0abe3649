"""One optimizer step of the tracker, as one pipeline read top to bottom.

:meth:`StepPipeline.before` runs once the step's gradients are final and before the optimizer
changes anything (the step pre-hook, or after the step's closure): the parameters are still
``θ_t`` and the optimizer state is the one the step starts from, so nothing needs copying or
reconstructing. It takes the norm of the gradient the step is about to use (a fused optimizer
unscales ``.grad`` in place during its step, so later is too late), then (1) the adapter's
pre-step record; (2) the step's terms: for the midpoint (the default) ``θ_t + Δ(G/2)`` and
``J`` as list-wide kernels of the optimizer family (:mod:`~inrun_shapley.engine.directions`);
(3) the validation gradient at the estimator's point (``θ_half`` or ``θ_t``), through wrappers
built once (the model is never written: ``torch.func.functional_call``); (4) for the midpoint,
the directions ``M`` (so that only ``M`` is held through the optimizer's update) and the
step-sum check's dot products. It returns a :class:`PreStep`. Then, in the step post-hook,
:meth:`StepPipeline.after`: (2)–(4) for the fixed-state estimators, which read the state after
the step; (5) every captured micro-batch scored into one values tensor on the device
(:mod:`~inrun_shapley.engine.scoring`); (6) the check's dot products; (7) one transfer to the
host of the values, the dot products, both norms and every flag, then the scale, the scaling
and the checks on the host (:mod:`~inrun_shapley.engine.step_io`). Nothing in (1)–(6) reads a
value on the host but the optimizer's step counts (one read for the whole model, where they are
device tensors), so on a GPU the step synchronizes once more at most. Each stage runs under
:func:`stage`, a named range in a profiler trace.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from inrun_shapley.capture.registry import up
from inrun_shapley.engine import sharding
from inrun_shapley.engine.capture_session import CaptureSession, MicroBatch
from inrun_shapley.engine.directions import (
    Estimator, direction, midpoint_terms, second_order_vector, step_terms,
)
from inrun_shapley.engine.queries import GhostQueries, PlanRow, plan_query_path
from inrun_shapley.engine.scoring import captured_in_half, grad_sq_norm, score_micro_batches
from inrun_shapley.engine.step_check import StepSumCheck
from inrun_shapley.engine.step_io import HostStep, to_host
from inrun_shapley.engine.tracked import TrackedModule
from inrun_shapley.engine.validation import ValidationObjective
from inrun_shapley.optim.base import OptimizerAdapter, Workspace, fe_mul

__all__ = ["STAGES", "PreStep", "StepPipeline", "amp_scaling", "stage"]

#: The step's stages as named ranges in a profiler trace (``torch.profiler``, Nsight, Kineto):
#: each runs under ``record_function("inrun_shapley/<stage>")``; ``benchmarks/step_stages.py``
#: sums them per step.
STAGES = ("before_step", "midpoint", "validation", "directions", "terms", "score", "grad_norm", "check",
          "to_host")


_NO_RANGE = contextlib.nullcontext()


def stage(name: str):
    """A profiler range named ``inrun_shapley/<name>`` while a profiler runs; otherwise nothing
    (an unconditional ``record_function`` costs ~10 µs each on a CPU)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"inrun_shapley/{name}")
    return _NO_RANGE


def amp_scaling(optimizer, kwargs: Mapping) -> tuple:
    """``(grad_scale, found_inf)`` a ``GradScaler`` handed a fused optimizer for this step, or Nones.

    ``GradScaler.step`` sets them as attributes of the optimizer for the length of its ``step()``
    (torch ≥ 2.1; keyword arguments of ``step`` are read too, for optimizers called that way). The
    optimizer's kernel divides ``.grad`` by ``grad_scale`` in place while it updates (so ``.grad``
    is scaled in the pre-hook and unscaled in the post-hook), and skips the update where
    ``found_inf`` is non-zero."""
    return (kwargs.get("grad_scale", getattr(optimizer, "grad_scale", None)),
            kwargs.get("found_inf", getattr(optimizer, "found_inf", None)))


@dataclass
class PreStep:
    """What :meth:`StepPipeline.before` hands the post-hook (stages 1–3; 1–4 for the midpoint)."""

    before: list = field(default_factory=list)  # the adapter's pre-step record per parameter
    theta: list | None = None  # theta_t per parameter, where needed (second order, loo)
    directions: dict | None = None  # the midpoint's directions M, formed before the step
    grads: list | None = None  # the midpoint's: the gradients the step uses (compute dtype)
    module_theta: dict = field(default_factory=dict)  # theta_t of rules that read parameters
    val_grads: list | None = None  # validation gradient at theta_t (estimators that take it there)
    ghost: GhostQueries | None = None  # per-query ghost path: the query side taken with val_grads
    flags: list = field(default_factory=list)  # device flags of the validation pass (non-finite losses)
    grad_sq_now: Tensor | None = None  # |ḡ|² of the gradients the step is about to use (device, float64)
    dots: tuple | None = None  # the midpoint's step-sum check inputs, taken while M and ḡ are fresh


class StepPipeline:
    """The tracker's step, from the optimizer's hooks to one host record of values.

    Built once per tracker: everything that does not change from step to step (the tracked
    parameters, their param groups, the modules' parameter lists) is set here.

    Args:
        model: the model.
        optimizer: the innermost torch optimizer.
        adapter: its adapter.
        validation: the validation objective.
        modules: the tracked modules.
        params: the tracked parameters (tracker order); ``param_group`` their group indices.
        estimator, order, per_query, query_path: as in the tracker.
        check: the step-sum check; ``keep_groups``: keep the per-module split.
        sharded: FSDP2 parameters (``adapter`` and ``validation`` are the sharded ones of
            :mod:`~inrun_shapley.engine.sharding`; scoring gathers ``M`` one layer at a time).
        fused: run the midpoint's elementwise pass as compiled kernels (``kernels="compiled"``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, adapter: OptimizerAdapter,
                 validation: ValidationObjective, modules: Mapping[str, TrackedModule], params: Sequence[nn.Parameter],
                 param_group: Sequence[int], *, estimator: Estimator, order: int, per_query: bool, query_path: str,
                 check: StepSumCheck, keep_groups: bool = False, sharded: bool = False, fused: bool = False):
        self.model, self.optimizer, self.adapter, self.validation = model, optimizer, adapter, validation
        self.modules, self.params, self.param_group = modules, list(params), list(param_group)
        self.estimator, self.order, self.per_query, self.query_path = estimator, order, per_query, query_path
        self.check, self.keep_groups, self.sharded = check, keep_groups, sharded
        self.score = sharding.score_sharded if sharded else score_micro_batches  # FSDP2: M gathered per layer
        self.module_params = {n: list(t.params.values()) for n, t in modules.items()}
        self.reading_modules = [name for name, t in modules.items() if t.rule.reads_parameters]
        self.query_plan: list[PlanRow] | None = None  # per-query values: set at the first step
        self.workspace = Workspace(fused=fused)  # CPU: buffers kept from step to step; compiled kernels
        self.compute_dtype = up(self.params[0].detach()).dtype
        self.device = self.params[0].device

    # ------------------------------------------------------------------ (1)-(4) before the step
    def before(self, step: int, session: CaptureSession, grad_scale=None, *, need_norm: bool = False,
               world_size: int = 1) -> PreStep:
        """Stages (1)–(3), and (4) for the midpoint, once the step's gradients are final and
        before the optimizer changes anything (parameters are ``θ_t``, the optimizer state is the
        one the step starts from).

        Args:
            step: the step about to happen (1-based).
            session: the capture session (the per-query cost model reads its captures' shapes).
            grad_scale: a fused optimizer's ``grad_scale`` (its ``p.grad`` is still scaled).
            need_norm: take ``|ḡ|²`` of the gradients the step is about to use (the tracker has an
                end-of-backward norm to set it against).
            world_size: data-parallel ranks averaging gradients (the step-sum check runs on one).
        """
        groups, state = self.optimizer.param_groups, self.optimizer.state
        # the norm is read again at the step, always: clipping rescales .grad, and GradScaler's unscale_
        # and FSDP2's sharded gradients change it without bumping its version counter, so no
        # cheaper test says the gradients are the ones seen at the end of backward. Read here, before
        # the update: a fused optimizer divides .grad by its grad_scale in place during the step
        pre_norm = None
        if need_norm:
            with stage("grad_norm"):
                pre_norm = grad_sq_norm(self.params)
        # (1) what the adapter and the rules need from before the step
        with stage("before_step"):
            pre = PreStep(before=[self.adapter.before_step(groups[g], state.get(p, {}))
                                  for p, g in zip(self.params, self.param_group)], grad_sq_now=pre_norm)
            pre.module_theta = {name: {pn: p.detach().clone() for pn, p in self.modules[name].params.items()}
                                for name in self.reading_modules}
        if self.estimator is Estimator.MIDPOINT:
            # (2) θ_t + Δ(G/2) and J from the state the step starts from, list-wide
            with stage("midpoint"):
                terms, theta_half, pre.grads = midpoint_terms(
                    self.adapter, self.optimizer, self.params, self.param_group,
                    None if grad_scale is None else torch.as_tensor(grad_scale, device=self.device),
                    self.workspace)
            # (3) the validation gradient there
            with stage("validation"):
                if self.per_query:
                    val_grads, pre.ghost = self._query_gradients(session, at=theta_half)
                else:
                    val_grads, _ = self.validation.gradient(self.model, self.params, step, at=theta_half,
                                                            flags=pre.flags)
            del theta_half
            # (4) the directions M, here: the optimizer's own temporaries then find g_v and J freed
            with stage("directions"):
                pre.directions = self._directions(terms, val_grads, None, pre.ghost)
            if self._checks_dots(pre.ghost, world_size):  # (6)'s device side, while M and ḡ are in cache
                with stage("check"):
                    pre.dots = self.check.dots(pre.directions, self.params, pre.grads)
            return pre
        if self.order == 2 or self.estimator.needs_theta_before:  # drift / L2 terms need theta_t
            detached = [p.detach() for p in self.params]
            pre.theta = self.workspace.get("theta_t", detached)
            if pre.theta is None:
                pre.theta = [p.clone() for p in detached]
            else:
                torch._foreach_copy_(pre.theta, detached)
        if self.order == 1:  # (3) the validation gradient at θ_t
            with stage("validation"):
                if self.per_query:
                    pre.val_grads, pre.ghost = self._query_gradients(session)
                else:
                    pre.val_grads, _ = self.validation.gradient(self.model, self.params, step, flags=pre.flags)
        return pre

    # ------------------------------------------------------------------ (5)-(7) after the step
    def after(self, pre: PreStep, step: int, session: CaptureSession, batches: Sequence[MicroBatch], *,
              grad_sq_backward: Tensor | None, grad_scale=None, found_inf=None,
              world_size: int = 1) -> HostStep:
        """Step post-hook: the step's values, on the host, after one transfer.

        Args:
            pre: what :meth:`before` returned for this step.
            step: the step that happened (1-based).
            session: the capture session; ``batches`` its micro-batches of this step.
            grad_sq_backward: ``|ḡ|²`` at the end of backward (device, float64), or None.
            grad_scale: a fused optimizer's ``grad_scale``: the captured output gradients carry it
                (the optimizer divided ``.grad`` by it in place during the step).
            found_inf: a fused optimizer's ``found_inf`` (the step was skipped where non-zero).
            world_size: data-parallel ranks averaging gradients.
        """
        flags = list(pre.flags)
        if pre.directions is not None:  # the midpoint: (2)-(4) done before the step
            directions, grads, ghost = pre.directions, pre.grads, pre.ghost
        else:  # (2) the fixed-state terms from the state after the step
            with stage("terms"):  # .grad is the gradient the step used: a fused optimizer unscaled it in place
                terms, grads = step_terms(
                    self.adapter, self.optimizer, self.params, self.param_group, pre.before, pre.theta,
                    need_drift=self.order == 2, need_loo=self.estimator.needs_loo_jacobian)
            hvps = None
            if self.order == 2:  # (3) g_v and H_v u at theta_t
                with stage("validation"):
                    (val_grads, hvps), ghost = self._second_order_terms(step, terms, grads, pre.theta, flags), None
            else:
                val_grads, ghost = pre.val_grads, pre.ghost
            # (4) the directions M
            with stage("directions"):
                directions = self._directions(terms, val_grads, hvps, ghost)
        # (5) every captured micro-batch scored on the device
        n_dirs = next(iter(directions.values())).shape[0] if directions else ghost.n_queries
        with stage("score"):
            scored = self.score(
                batches, self.modules, directions, theta=pre.module_theta, ghost=ghost, n_directions=n_dirs,
                per_query=self.per_query, keep_groups=self.keep_groups, device=self.device,
                dtype=self.compute_dtype)
        # (6) the checks' inputs
        dots = pre.dots
        if pre.directions is None and self._checks_dots(ghost, world_size):
            with stage("check"):
                dots = self.check.dots(directions, self.params, grads)
        # (7) one transfer to the host, with the flags and both norms; scaled there
        with stage("to_host"):
            host = to_host(scored, dots, flags, found_inf, grad_sq_backward=grad_sq_backward, grad_sq_now=pre.grad_sq_now,
                           grad_scale=grad_scale, world_size=world_size, per_query=self.per_query, step=step)
        if not host.skipped:
            with stage("check"):
                self.check(step, host, dot_params=None if dots is None else dots[1],
                           module_params=self.module_params, compute_dtype=self.compute_dtype,
                           low_precision=captured_in_half(batches))
        return host

    # ------------------------------------------------------------------ the stages' parts
    def _checks_dots(self, ghost, world_size: int) -> bool:
        """Whether the step-sum check runs: not on the ghost path (no per-parameter ``M``), not
        with several ranks or shards (each holds a part of the sum), not when it is off."""
        return ghost is None and world_size == 1 and not self.sharded and self.check.mode != "off"

    def _directions(self, terms, val_grads, hvps, ghost) -> dict[int, Tensor]:
        """Per tracked parameter (by id) its direction ``M`` as ``[Q, *shape]`` (``Q = 1`` unless
        per query), in the compute dtype; parameters the step did not update and ghost-path
        parameters have none (the latter are scored through ``ghost``, prepared here)."""
        keep = [i for i, t in enumerate(terms) if t is not None and val_grads[i] is not None]
        if self.estimator is Estimator.MIDPOINT and hvps is None and not self.per_query and keep:
            # M = -J ⊙ g_half, list-wide
            jacs = [terms[i].jacobian for i in keep]
            held = self.workspace.get("direction", jacs)
            ms = fe_mul(jacs, [val_grads[i] for i in keep], out=held)
            torch._foreach_neg_(ms)
            if held is not None:  # the small ones too: M is held through the optimizer's update
                small = [k for k, (m, b) in enumerate(zip(ms, held)) if m is not b]
                if small:
                    torch._foreach_copy_([held[k] for k in small], [ms[k] for k in small])
                    ms = held
            out = {id(self.params[i]): m.unsqueeze(0) for i, m in zip(keep, ms)}
        else:
            out = {}
            for i in keep:
                m = direction(self.estimator, terms[i], val_grads[i], None if hvps is None else hvps[i])
                out[id(self.params[i])] = m if self.per_query else m.unsqueeze(0)
        if self.per_query and ghost is not None:
            ghost.prepare({id(p): t for p, t in zip(self.params, terms)}, self.estimator)
        return out

    def _query_gradients(self, session: CaptureSession, at: list[Tensor] | None = None):
        """Per-query validation gradients (at the current parameters, or at ``at``, one value per
        tracked parameter) and the ghost path's query side taken in the same pass (or None);
        ghost-path parameters get None."""
        if self.query_plan is None:
            preconditioned = self.adapter.name != "sgd" and self.estimator in (Estimator.SHAPLEY, Estimator.MIDPOINT)
            self.query_plan = plan_query_path(
                self.query_path, self.modules, estimator=self.estimator, validation=self.validation,
                model=self.model, preconditioned=preconditioned, train_positions=session.train_positions() or None,
            )
        ghost_names = [row.module for row in self.query_plan if row.path == "ghost"]
        if not ghost_names:
            return self.validation.query_gradients(self.model, self.params, at=at), None
        ghost = GhostQueries({name: self.modules[name].module for name in ghost_names})
        exact = [i for i, p in enumerate(self.params) if id(p) not in ghost.param_ids]
        point = None if at is None else {id(p): at[i] for i, p in enumerate(self.params) if id(p) in ghost.param_ids}
        grads = self.validation.query_gradients(
            self.model, [self.params[i] for i in exact], observe=ghost.observe,
            at=None if at is None else [at[i] for i in exact], point=point,
        )
        out: list = [None] * len(self.params)
        for i, g in zip(exact, grads):
            out[i] = g
        return out, ghost

    def _second_order_terms(self, step: int, terms, grads, theta, flags):
        """``g_v`` and ``H_v u`` at theta_t, with ``u = d0 + ½ Σ_j δ_j`` (docs/math.md §2), evaluated
        on the saved theta_t through ``functional_call``: the parameters are never written."""
        u = [up(torch.zeros_like(p)) if t is None else second_order_vector(t, g)
             for t, g, p in zip(terms, grads, self.params)]
        if self.per_query:  # H_q u for every query q (u is shared)
            return self.validation.query_gradients(self.model, self.params, hvp_vectors=u, at=theta)
        return self.validation.gradient(self.model, self.params, step, hvp_vectors=u, at=theta, flags=flags)
