"""One optimizer step's directions: what is read in the step pre-hook, and ``M`` in the post-hook.

The pre-hook (parameters still ``theta_t``) keeps what the post-hook can no longer read: the
optimizer state's pre-step part, ``theta_t`` where a rule or estimator needs it, and the
validation gradient of estimators that take it at ``theta_t``. The post-hook reads the step
terms and turns them into one direction per parameter through the pure functions of
:mod:`~inrun_shapley.engine.directions`. Validation passes never write the model's parameters:
points other than the current parameters are evaluated with ``torch.func.functional_call``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from inrun_shapley.capture.registry import up
from inrun_shapley.engine.capture_session import CaptureSession
from inrun_shapley.engine.directions import Estimator, direction, midpoint_terms, second_order_vector, step_terms
from inrun_shapley.engine.queries import GhostQueries, PlanRow, plan_query_path
from inrun_shapley.engine.tracked import TrackedModule
from inrun_shapley.engine.validation import ValidationObjective
from inrun_shapley.optim.base import OptimizerAdapter

__all__ = ["StepDirections"]


class StepDirections:
    """Per-step state between the step hooks, and the step's directions ``M``.

    Args:
        model: the model.
        optimizer: the innermost torch optimizer.
        adapter: its adapter.
        validation: the validation objective.
        modules: the tracked modules.
        params: the tracked parameters (tracker order); ``param_group`` their group indices.
        estimator, order, per_query, query_path: as in the tracker.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, adapter: OptimizerAdapter,
                 validation: ValidationObjective, modules: Mapping[str, TrackedModule], params: Sequence[nn.Parameter],
                 param_group: Sequence[int], *, estimator: Estimator, order: int, per_query: bool, query_path: str):
        self.model, self.optimizer, self.adapter, self.validation = model, optimizer, adapter, validation
        self.modules, self.params, self.param_group = modules, list(params), list(param_group)
        self.estimator, self.order, self.per_query, self.query_path = estimator, order, per_query, query_path
        self.query_plan: list[PlanRow] | None = None  # per-query values: set at the first step
        self.ghost: GhostQueries | None = None  # this step's ghost-path query side
        self.module_theta: dict[str, dict[str, Tensor]] = {}  # theta_t of rules that read parameters
        self._before: list[dict] = []
        self._snapshots: list[dict | None] = []  # pre-step state copies where reconstruction is inexact
        self._theta_before: list[Tensor] | None = None
        self._val_grads: list | None = None
        self.used_grads: list[Tensor | None] = []  # this step's gradient per parameter (post-hook)

    def before_step(self, step: int, session: CaptureSession) -> None:
        """Step pre-hook work (parameters are ``theta_t``; ``.grad`` is not read).

        Args:
            step: the step about to happen (1-based).
            session: the capture session (the per-query cost model reads its captures' shapes).
        """
        state = self.optimizer.state
        self._before = [self.adapter.before_step(self.optimizer.param_groups[g], state.get(p, {}))
                        for p, g in zip(self.params, self.param_group)]
        self.module_theta = {
            name: {pn: p.detach().clone() for pn, p in t.params.items()}
            for name, t in self.modules.items()
            if t.rule.reads_parameters
        }
        if self.order == 2 or self.estimator.needs_theta_before:  # drift / L2 decay terms / midpoint need theta_t
            self._theta_before = [p.detach().clone() for p in self.params]
        if self.estimator is Estimator.MIDPOINT:
            # amsgrad's previous running max cannot always be reconstructed after the step: copy it
            self._snapshots = [
                self.adapter.snapshot_state(self.optimizer.param_groups[g], state.get(p, {}))
                if self.optimizer.param_groups[g].get("amsgrad") else None
                for p, g in zip(self.params, self.param_group)
            ]
        self._val_grads = None
        if self.order == 1 and self.estimator.validation_point == "theta_t":
            if self.per_query:
                self._val_grads = self._query_gradients(session)
            else:
                self._val_grads, _ = self.validation.gradient(self.model, self.params, step)

    def _query_gradients(self, session: CaptureSession, at: list[Tensor] | None = None) -> list:
        """Per-query validation gradients (at the current parameters, or at ``at``, one value per
        tracked parameter); ghost-path parameters get None and :attr:`ghost` holds the query
        captures taken in the same pass."""
        if self.query_plan is None:
            preconditioned = self.adapter.name != "sgd" and self.estimator in (Estimator.SHAPLEY, Estimator.MIDPOINT)
            self.query_plan = plan_query_path(
                self.query_path, self.modules, estimator=self.estimator, validation=self.validation,
                model=self.model, preconditioned=preconditioned, train_positions=session.train_positions() or None,
            )
        ghost_names = [row.module for row in self.query_plan if row.path == "ghost"]
        if not ghost_names:
            self.ghost = None
            return self.validation.query_gradients(self.model, self.params, at=at)
        self.ghost = GhostQueries({name: self.modules[name].module for name in ghost_names})
        exact = [i for i, p in enumerate(self.params) if id(p) not in self.ghost.param_ids]
        point = None if at is None else {id(p): at[i] for i, p in enumerate(self.params) if id(p) in self.ghost.param_ids}
        grads = self.validation.query_gradients(
            self.model, [self.params[i] for i in exact], ghost=self.ghost,
            at=None if at is None else [at[i] for i in exact], point=point,
        )
        out: list = [None] * len(self.params)
        for i, g in zip(exact, grads):
            out[i] = g
        return out

    def directions(self, step: int, session: CaptureSession | None = None, grad_divisor: float = 1.0) -> dict[int, Tensor]:
        """Step post-hook: per tracked parameter (by id) its direction ``M`` as ``[Q, *shape]``
        (``Q = 1`` unless per query), in the compute dtype; parameters the step did not update and
        ghost-path parameters have none (the latter are scored through :attr:`ghost`).

        Args:
            step: the step that happened (1-based).
            session: the capture session (per-query planning at the first step of the midpoint).
            grad_divisor: a fused optimizer's ``grad_scale`` (its ``p.grad`` is still scaled).
        """
        if self.estimator is Estimator.MIDPOINT:
            terms, theta_half, grads = midpoint_terms(
                self.adapter, self.optimizer, self.params, self.param_group, self._before, self._snapshots,
                self._theta_before, grad_divisor)
            self._theta_before = None  # θ_t is no longer needed: free it before the validation pass
            if self.per_query:
                val_grads = self._query_gradients(session, at=theta_half)
            else:
                val_grads, _ = self.validation.gradient(self.model, self.params, step, at=theta_half)
            del theta_half
            hvps = None
            self.used_grads = grads
            return self._assemble(terms, val_grads, hvps)
        terms, grads = step_terms(
            self.adapter, self.optimizer, self.params, self.param_group, self._before, self._theta_before,
            need_drift=self.order == 2, need_loo=self.estimator.needs_loo_jacobian,
        )
        self.used_grads = grads if grad_divisor == 1.0 else [None if g is None else g / grad_divisor for g in grads]
        if self.order == 2:
            val_grads, hvps = self._second_order_terms(step, terms, grads)
        else:
            val_grads, hvps = self._val_grads, None
        return self._assemble(terms, val_grads, hvps)

    def _assemble(self, terms, val_grads, hvps) -> dict[int, Tensor]:
        """Directions from the step terms and validation gradients (and the ghost query side)."""
        out = {}
        for i, (p, t) in enumerate(zip(self.params, terms)):
            if t is None or val_grads[i] is None:  # no step, or a ghost-path parameter
                continue
            m = direction(self.estimator, t, val_grads[i], None if hvps is None else hvps[i])
            out[id(p)] = m if self.per_query else m.unsqueeze(0)
        if self.per_query and self.ghost is not None:
            self.ghost.prepare({id(p): t for p, t in zip(self.params, terms)}, self.estimator)
        return out

    def _second_order_terms(self, step: int, terms, grads):
        """``g_v`` and ``H_v u`` at theta_t, with ``u = d0 + ½ Σ_j δ_j`` (docs/math.md §2), evaluated
        on the saved theta_t through ``functional_call``: the parameters are never written."""
        u = [up(torch.zeros_like(p)) if t is None else second_order_vector(t, g)
             for t, g, p in zip(terms, grads, self.params)]
        if self.per_query:  # H_q u for every query q (u is shared)
            return self.validation.query_gradients(self.model, self.params, hvp_vectors=u, at=self._theta_before)
        return self.validation.gradient(self.model, self.params, step, hvp_vectors=u, at=self._theta_before)

    def reset(self) -> None:
        """Forget the step's state once it was scored."""
        self._val_grads = None
        self._theta_before = None
        self._snapshots = []
        self.used_grads = []
        self.ghost = None
