"""Module hooks and micro-batch bookkeeping: what one tracker saw since the last optimizer step.

During the ordinary forward/backward of each marked micro-batch, forward hooks on the tracked
modules keep each call's inputs ``a`` (detached, no copy) and tensor hooks on its outputs keep the
output gradients ``b``. Micro-batches wait in ``pending`` until the optimizer step that uses
their gradients scores them.

A tracker's own passes (validation gradients, replays) run under :meth:`CaptureSession.suspend`,
which pauses this session only. Another tracker's passes on the same model are told apart
because they run on stand-in parameters (``torch.func.functional_call``): a call in which the
module's parameters are not the tracked ones is never captured.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from inrun_shapley.batches import detach
from inrun_shapley.capture import Capture
from inrun_shapley.capture.jvp import _tensor_outputs
from inrun_shapley.engine.ids import as_sample_ids, check_disjoint
from inrun_shapley.engine.tracked import TrackedModule
from inrun_shapley.errors import SampleIdError, UnsupportedModuleError

__all__ = ["CaptureSession", "MicroBatch"]


@dataclass
class MicroBatch:
    """One marked micro-batch: its sample ids and the captures of every tracked module call."""

    ids: Tensor  # [n] int64 (CPU)
    captures: dict[str, list[Capture]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """A gradient reached at least one tracked module call."""
        return any(c.complete for caps in self.captures.values() for c in caps)


def _resolve(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class CaptureSession:
    """Forward hooks on the tracked modules and the micro-batches of the current step.

    Args:
        modules: ``{qualified name: TrackedModule}`` to hook.
    """

    def __init__(self, modules: Mapping[str, TrackedModule]):
        self.modules = dict(modules)
        self.open: MicroBatch | None = None
        self.open_consumed = False  # the open micro-batch was already scored (Lightning's order)
        self.pending: list[MicroBatch] = []
        self._suspended = 0
        self._rng_states: dict[str, Any] = {}
        self._handles: list = []
        # one tracked parameter per module: a call that does not see it runs on stand-ins
        self._probe = {name: next(iter(t.params.items())) for name, t in self.modules.items()}

    # ---------------------------------------------------------------- hooks
    def attach(self) -> list:
        """Register the module hooks; returns their handles (also removed by :meth:`detach`)."""
        for name, tracked in self.modules.items():
            if tracked.rule.needs_rng:
                self._handles.append(tracked.module.register_forward_pre_hook(partial(self._save_rng, name)))
            self._handles.append(tracked.module.register_forward_hook(partial(self._capture, name), with_kwargs=True))
        return list(self._handles)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def suspend(self) -> Iterator[None]:
        """No capture by this session inside the block (the tracker's own passes)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def capturing(self) -> bool:
        """A micro-batch is open, this session is not suspended, and autograd is recording."""
        return self.open is not None and self._suspended == 0 and torch.is_grad_enabled()

    def _own_parameters(self, name: str, module: nn.Module) -> bool:
        pname, p = self._probe[name]
        try:
            return _resolve(module, pname) is p
        except AttributeError:
            return False

    def _save_rng(self, name: str, module, args) -> None:
        if self.capturing() and self._own_parameters(name, module):
            cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self._rng_states[name] = (torch.get_rng_state(), cuda)

    def _capture(self, name: str, module, args, kwargs, output) -> None:
        if not self.capturing() or not self._own_parameters(name, module):
            return
        rule = self.modules[name].rule
        reason = rule.check(module)
        if reason:
            raise UnsupportedModuleError(f"module {name!r} ({type(module).__name__}): {reason}")
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            first = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        n_ids = self.open.ids.numel()
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
        cap = Capture(args=detach(args), kwargs=detach(kwargs), rng_state=self._rng_states.pop(name, None))
        cap.grad_outputs = [None] * len(outputs)
        for j, out in enumerate(outputs):
            if out is not None and out.requires_grad:
                out.register_hook(partial(self._store_grad, cap, j))
        self.open.captures.setdefault(name, []).append(cap)

    @staticmethod
    def _store_grad(cap: Capture, j: int, grad: Tensor) -> None:
        prev = cap.grad_outputs[j]
        cap.grad_outputs[j] = grad.detach() if prev is None else prev + grad.detach()

    # ---------------------------------------------------------------- micro-batches
    def begin(self, ids) -> MicroBatch:
        """Open a micro-batch with sample ids ``ids`` (checked; closes one still open).

        Raises:
            SampleIdError: bad ids, or ids already in an earlier micro-batch of this step.
        """
        ids = as_sample_ids(ids)
        if self.open is not None:
            self.end()
        check_disjoint(torch.cat([mb.ids for mb in self.pending]) if self.pending else None, ids)
        self.open = MicroBatch(ids)
        self.open_consumed = False
        return self.open

    def end(self) -> None:
        """Close the open micro-batch; kept for the next step if a gradient reached it."""
        mb = self.open
        if mb is not None and not self.open_consumed and mb.complete:
            self.pending.append(mb)
        self.open = None

    def step_batches(self) -> list[MicroBatch]:
        """The micro-batches a step now happening scores: pending, plus the open one unless scored."""
        return self.pending + ([self.open] if self.open is not None and not self.open_consumed else [])

    def all_batches(self) -> list[MicroBatch]:
        """Pending and open micro-batches (for shape probes)."""
        return self.pending + ([self.open] if self.open is not None else [])

    def finish_step(self) -> None:
        """The step's micro-batches were scored (or dropped): forget them."""
        self.pending.clear()
        if self.open is not None:
            self.open_consumed = True

    def drop_pending(self) -> bool:
        """Drop micro-batches whose step never happened; True if there were any."""
        had = bool(self.pending)
        self.pending.clear()
        return had

    def train_positions(self) -> dict[str, int]:
        """``{module: rows × positions}`` of the step's captures (the per-query cost model's ``B·T``)."""
        positions: dict[str, int] = {}
        for mb in self.all_batches():
            for name, caps in mb.captures.items():
                for cap in caps:
                    x = cap.args[0] if cap.args and isinstance(cap.args[0], Tensor) else None
                    if x is not None and x.dim() > 0:
                        per = x.numel() if x.dtype in (torch.int64, torch.int32) else x.numel() // x.shape[-1]
                        positions[name] = positions.get(name, 0) + per
        return positions
