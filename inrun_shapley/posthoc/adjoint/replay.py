"""The per-step states the adjoint pass walks through: read from an ``every=1`` recording, or
replayed forward from the checkpoints of an ``every=k`` one with the optimizer's own update
(:mod:`inrun_shapley.optim`)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from inrun_shapley.errors import ConfigurationError, LogError
from inrun_shapley.optim import adam, sgd
from inrun_shapley.posthoc.adjoint.stepper import GRAD_TOL, Stepper
from inrun_shapley.posthoc.adjoint.work import cast, rows_of
from inrun_shapley.trajectory import Recording, StepState


def optimizer_step(stepper: Stepper, st: StepState, theta: torch.Tensor, g: torch.Tensor,
                   states: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """The recorded optimizer's step ``st`` at ``theta`` with gradient ``g`` (flat ``[P]``), from the
    per-tensor ``states`` before it: ``(Δθ [P], states after it)``."""
    rec = stepper.rec
    family = adam if rec.optimizer == "adam" else sgd
    deltas, after = [], []
    for j, (th, gj) in enumerate(zip(theta.split(rec.numels), g.split(rec.numels))):
        group = stepper.group(st, j)
        if family is sgd and not st.had_buffer[j]:
            states[j] = {sgd.MOMENTUM_BUFFER: None}
        deltas.append(family.update(gj, th, group, states[j]))
        after.append(family.state_after_step(gj, th, group, states[j]))
    return torch.cat(deltas), after


class Source:
    """Per-step states (oldest first within a segment), read or replayed from checkpoints."""

    def __init__(self, rec: Recording, stepper: Stepper, train_data, dtype):
        self.rec, self.stepper, self.train_data, self.dtype = rec, stepper, train_data, dtype
        self.max_replay_error = 0.0

    def rows(self, ids):
        return cast(rows_of(self.train_data, ids), self.dtype)

    def segments(self, first: int, last: int) -> list[tuple[int, int]]:
        """Inclusive step ranges: one per step (``every=1``) or one per checkpoint."""
        if self.rec.every == 1:
            return [(s, s) for s in range(first, last + 1)]
        cks = [c for c in self.rec.checkpoint_steps if c <= last]
        segs = []
        for i, c in enumerate(cks):
            end = (cks[i + 1] - 1) if i + 1 < len(cks) else last
            if end >= first:
                segs.append((c, end))
        return segs

    def states(self, seg: tuple[int, int]) -> list[StepState]:
        """States of the steps of ``seg``, oldest first, tensors filled."""
        if self.rec.every == 1:
            st = self.rec.state(seg[0])
            if st.theta is None:
                raise LogError(f"step {seg[0]}: θ was not recorded")
            return [st]
        return list(self._replay(*seg))

    def _initial_states(self, start: int, ck: dict, theta: torch.Tensor) -> list[dict]:
        """Per tensor, the optimizer state before step ``start`` (torch's keys)."""
        rec, dt = self.rec, self.dtype
        fresh = bool(np.all(np.asarray(ck["opt_step"]) == 0)) and not bool(np.any(ck["had_buffer"]))
        zeros = torch.zeros_like(theta)

        def flat(key):
            if key in ck:
                return ck[key].to(dt)
            if fresh or key == adam.MAX_EXP_AVG_SQ:
                return zeros.clone()
            raise ConfigurationError(
                f"checkpoint before step {start}: the optimizer state ({key}) was not recorded; record with "
                "TrajectoryRecorder(..., optimizer_state=True)"
            )

        if rec.optimizer == "adam":
            parts = {k: flat(k).split(rec.numels) for k in adam.STATE_KEYS}
            return [{adam.STEP: float(ck["opt_step"][j]), **{k: parts[k][j] for k in adam.STATE_KEYS}}
                    for j in range(len(rec.numels))]
        if sgd.MOMENTUM_BUFFER not in ck and bool(np.any(ck["had_buffer"])):
            raise ConfigurationError(
                f"checkpoint before step {start}: the momentum buffer was not recorded; record with "
                "TrajectoryRecorder(..., optimizer_state=True)"
            )
        bufs = ck[sgd.MOMENTUM_BUFFER].to(dt).split(rec.numels) if sgd.MOMENTUM_BUFFER in ck else None
        return [{sgd.MOMENTUM_BUFFER: bufs[j] if bufs is not None and ck["had_buffer"][j] else None}
                for j in range(len(rec.numels))]

    def _replay(self, start: int, end: int) -> Iterator[StepState]:
        rec, dt, stepper = self.rec, self.dtype, self.stepper
        ck = rec.checkpoint(start)
        theta = ck["theta"].to(dt)
        states = self._initial_states(start, ck, theta)
        family = adam if rec.optimizer == "adam" else sgd
        for s in range(start, end + 1):
            st = rec.state(s)
            g, _, _ = stepper.work.terms(theta, self.rows(st.ids))
            norm = float(g.double().norm())
            if abs(norm - st.grad_norm) > GRAD_TOL * max(st.grad_norm, 1e-12):
                raise ConfigurationError(
                    f"replay of step {s} diverged: the recorded gradient norm is {st.grad_norm:.6g} but loss_fn on "
                    f"the recorded batch gives {norm:.6g} (gradient clipping, loss scaling, dropout, or a different "
                    "loss_fn/reduction than in training?). Record with every=1 for such runs."
                )
            st.theta, st.grad = theta, g
            delta, after = optimizer_step(stepper, st, theta, g, states)
            states = after
            if family is adam:
                st.exp_avg = torch.cat([a[adam.EXP_AVG] for a in after])
                st.exp_avg_sq = torch.cat([a[adam.EXP_AVG_SQ] for a in after])
                if any(adam.MAX_EXP_AVG_SQ in a for a in after):
                    st.max_exp_avg_sq = torch.cat([a.get(adam.MAX_EXP_AVG_SQ, a[adam.EXP_AVG_SQ]) for a in after])
            yield st
            theta = theta + delta
        if end == rec.last_step:
            ref = rec.final_theta().to(dt)
            self.max_replay_error = max(self.max_replay_error,
                                        float((theta - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))

