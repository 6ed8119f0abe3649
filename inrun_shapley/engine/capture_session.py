"""Module hooks and micro-batch bookkeeping: what one tracker saw since the last optimizer step.

During the ordinary forward/backward of each marked micro-batch, forward hooks on the tracked
modules keep each call's inputs ``a`` (detached, no copy) and tensor hooks on its outputs keep the
output gradients ``b``. Micro-batches wait in ``pending`` until the optimizer step that uses
their gradients scores them.

Rows. Each call's rows are the first dimension of its first input (a rule may say otherwise:
recurrent layers with ``batch_first=False``). A call sees either the micro-batch's ``n`` samples,
or samples flattened sample-major with their positions (``[n·T, ...]``, e.g. a head applied to
``h.view(-1, d)``); at least one tracked call of each micro-batch must see exactly ``n`` rows, so
that fewer ids than samples is caught. Two kinds of call share one input by every sample:

* a leading dimension of 1 (``pos(position_ids)`` with ``position_ids`` of shape ``[1, T]``): its
  output is replaced by the same values expanded to ``[n, ...]`` (a view: it broadcasts exactly
  as the ``[1, ...]`` output did), and its input is recorded expanded the same way;
* no batch dimension at all (nanoGPT's ``wpe(torch.arange(T))``, ``[T, d]``): a call whose rows
  are not ``n``, or whose inputs are off the graph and not views of the model's input, is watched
  (:mod:`~inrun_shapley.engine.use_sites`); if an op broadcasts its output over the batch, its
  per-sample output gradients are read at that op and its input is recorded expanded to the
  samples. Its shape alone never decides: ``T`` a multiple of ``n`` is the usual case. A watched
  call that no op broadcasts keeps the flattened reading (its rows must then be a multiple of
  ``n``; checked at the end of the model's forward).

Code that indexes a shared output (``pos_out[0]``) instead of broadcasting it would give every
value to the first sample; an input of leading dimension ``k·n`` that no op broadcasts is always
read as ``n`` samples flattened sample-major.

Raw parameters of a module that also has children (a ViT's ``pos_embed``) are read at their use
sites too (:class:`~inrun_shapley.capture.sites.ParameterSiteRule`).

BatchNorm. Every BatchNorm of the model is watched (forward pre-hook): one normalizing with
batch statistics while a micro-batch is captured is refused (or, ``strict=False``, warned once).

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

from inrun_shapley.batches import detach, leading_dim
from inrun_shapley.capture import Capture
from inrun_shapley.capture.registry import autocast_state
from inrun_shapley.capture.norm import BATCH_STATISTICS, uses_batch_statistics
from inrun_shapley.capture.outputs import tensor_leaves
from inrun_shapley.capture.sites import residual_ok
from inrun_shapley.engine.ids import as_sample_ids
from inrun_shapley.engine.tracked import TrackedModule, warn_batch_statistics
from inrun_shapley.engine.use_sites import UseSites, expand_shared
from inrun_shapley.errors import SampleIdError, UnsupportedModuleError

__all__ = ["CaptureSession", "MicroBatch"]


@dataclass
class MicroBatch:
    """One marked micro-batch: its sample ids and the captures of every tracked module call."""

    ids: Tensor  # [n] int64 (CPU)
    captures: dict[str, list[Capture]] = field(default_factory=dict)
    rows_seen: set = field(default_factory=set)  # rows of the tracked calls, shared calls left out
    data_rows: set = field(default_factory=set)  # rows of the model's input and of tracked inputs off the graph
    shared: list = field(default_factory=list)  # names of the modules called on one row shared by the samples
    inputs: set = field(default_factory=set)  # storages of the model's input tensors (data pointers)
    suspects: list = field(default_factory=list)  # (name, capture, rows, input off the graph) read at the end

    @property
    def complete(self) -> bool:
        """A gradient reached at least one tracked module call."""
        return any(c.complete for caps in self.captures.values() for c in caps)

    def check_suspect(self, name: str, cap: Capture, rows: int | None) -> None:
        """Raise unless a call whose output no op broadcast over the batch has rows that are
        samples, or samples flattened sample-major."""
        n = self.ids.numel()
        if not cap.per_sample and (rows is None or rows % n != 0):
            raise SampleIdError(
                f"module {name!r} was called on an input with first dimension {rows}, but the batch "
                f"has {n} sample ids, and no operation broadcast its output over the batch. The tracker "
                "needs the sample dimension first (or samples flattened sample-major into it), or an "
                "output without the batch dimension that an elementwise operation (x + pos(...)) "
                "broadcasts over it: give one id per row of the batch"
            )

    def check_rows(self) -> None:
        """Raise unless the batch is seen to have exactly one row per sample id.

        A tracked call on exactly ``n`` rows is the evidence; when a call was shared by the
        samples (its output expanded to ``n`` rows), only rows no expansion can have produced
        count: the model's own input, or a tracked input that does not require gradients.

        Raises:
            SampleIdError: no such evidence: fewer ids than samples would lump several samples
                onto one id, more ids than samples would split one sample's shared call.
        """
        n = self.ids.numel()
        if not self.complete:
            return
        shared, rows_seen, data_rows = list(self.shared), set(self.rows_seen), set(self.data_rows)
        for name, cap, rows, off_graph in self.suspects:
            if cap.per_sample:  # an op broadcast its output over the batch: a call without the batch
                shared.append(name)
                continue
            if not cap.complete:
                continue
            self.check_suspect(name, cap, rows)
            rows_seen.add(rows)
            if off_graph:
                data_rows.add(rows)
        if shared:
            if n in data_rows:
                return
            raise SampleIdError(
                f"module(s) {sorted(set(shared))} were called on one row shared by the batch's {n} sample "
                f"ids, but the model's input had first dimension {sorted(data_rows) or 'unknown'}: give "
                "one id per sample of the batch (a module shared by every sample, like a position "
                "embedding, is only valued inside a batch whose samples the model sees)"
            )
        if n in rows_seen or n in data_rows:
            return
        raise SampleIdError(
            f"the batch has {n} sample ids, but no tracked module was called on {n} rows (first "
            f"dimensions seen: {sorted(rows_seen | data_rows)}): give one id per sample of the "
            "batch. Layers applied to samples flattened with their positions ([n*T, ...]) are read "
            "sample-major, which needs at least one tracked layer seeing the n samples themselves "
            "(keep [n, T, ...] there: Linear, Embedding and the norms take any leading dimensions)"
        )


def _storage(t: Tensor) -> int:
    """Where a tensor's data lives: views of one tensor share it."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional)
        return id(t)


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
        self._batch_norms = dict(getattr(modules, "batch_norms", {}))  # watched, tracked or not
        self._strict = getattr(modules, "strict", True)
        self._root = getattr(modules, "root", None)
        # strict=False: warned at construction for these; the forward check warns for the others
        self._warned_batch_norm = any(uses_batch_statistics(m) for m in self._batch_norms.values())
        self.open: MicroBatch | None = None
        self.open_consumed = False  # the open micro-batch was already scored (Lightning's order)
        self.pending: list[MicroBatch] = []
        self._suspended = 0
        self._rng_states: dict[str, Any] = {}
        self._handles: list = []
        # one tracked parameter per module: a call that does not see it runs on stand-ins
        self._probe = {name: next(iter(t.params.items())) for name, t in self.modules.items()}
        self.unsharded = None  # FSDP2: p -> the full parameter a module sees in its forward (engine/sharding.py)
        # use sites: raw parameters of modules with children, outputs of calls without the batch
        self._sites = UseSites(self.modules, self.capturing, lambda: self._suspended > 0)

    # ---------------------------------------------------------------- hooks
    def attach(self) -> list:
        """Register the module hooks; returns their handles (also removed by :meth:`detach`)."""
        for name, tracked in self.modules.items():
            if name in self._sites.modules:  # scored from their use sites, watched while their forward runs
                self._handles.append(tracked.module.register_forward_pre_hook(self._site_forward_start))
                self._handles.append(tracked.module.register_forward_hook(self._site_forward_end, always_call=True))
                continue
            if tracked.rule.needs_rng:
                self._handles.append(tracked.module.register_forward_pre_hook(partial(self._save_rng, name)))
            self._handles.append(tracked.module.register_forward_hook(partial(self._capture, name), with_kwargs=True))
        for name, module in self._batch_norms.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._check_batch_norm, name)))
        if self._root is not None:
            self._handles.append(self._root.register_forward_pre_hook(self._see_model_input, with_kwargs=True))
            self._handles.append(self._root.register_forward_hook(self._end_of_model_forward))
        return list(self._handles)

    def detach(self) -> None:
        self._sites.stop()
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
            seen = _resolve(module, pname)
            return seen is p or (self.unsharded is not None and seen is self.unsharded(p))
        except AttributeError:
            return False

    def _save_rng(self, name: str, module, args) -> None:
        if self.capturing() and self._own_parameters(name, module):
            cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self._rng_states[name] = (torch.get_rng_state(), cuda)

    def _see_model_input(self, module, args, kwargs) -> None:
        if self.capturing():
            rows = leading_dim((args, kwargs))
            if rows is not None:
                self.open.data_rows.add(rows)
            self.open.inputs.update(_storage(t) for t in tensor_leaves((args, kwargs)))
            self._sites.forward_start(self.open, self.open.ids.numel())

    def _site_forward_start(self, module, args) -> None:
        if self.capturing():
            self._sites.forward_start(self.open, self.open.ids.numel())

    def _site_forward_end(self, module, args, output) -> None:
        if self.capturing():
            self._sites.forward_end()

    def _end_of_model_forward(self, module, args, output) -> None:
        """Every op of the forward ran: a call without the batch that no op broadcast is refused now."""
        if self.capturing():
            self._sites.forward_end()
            for name, cap, rows, _ in self.open.suspects:
                self.open.check_suspect(name, cap, rows)

    def _check_batch_norm(self, name: str, module, args) -> None:
        if not self.capturing() or not uses_batch_statistics(module):
            return
        if self._strict:
            raise UnsupportedModuleError(f"module {name!r} ({type(module).__name__}): {BATCH_STATISTICS}")
        if not self._warned_batch_norm:
            self._warned_batch_norm = True
            warn_batch_statistics([name], stacklevel=2)

    def _capture(self, name: str, module, args, kwargs, output):
        self._sites.settle()
        if not self.capturing() or not self._own_parameters(name, module):
            return None
        rule = self.modules[name].rule
        reason = rule.check(module)
        if reason == BATCH_STATISTICS and not self._strict:
            return None  # warned by the pre-hook; this BatchNorm's own parameters get no values
        if reason:
            raise UnsupportedModuleError(f"module {name!r} ({type(module).__name__}): {reason}")
        n_ids = self.open.ids.numel()
        rows = rule.rows(module, args, kwargs)
        shared = rows == 1 and n_ids > 1
        if shared and not rule.broadcastable:
            raise SampleIdError(
                f"module {name!r} ({type(module).__name__}) was called on 1 row, but the batch has "
                f"{n_ids} sample ids: give it the batch's {n_ids} samples (one id per sample)"
            )
        inputs = [t for t in tensor_leaves((args, kwargs)) if t.dim() > 0]
        off_graph = not any(t.requires_grad for t in inputs)
        # A call that may lack the batch dimension: rows other than the samples, or inputs neither
        # on the graph nor views of the model's input (positions built inside the model). Whether
        # it lacks it is never read from its shape: an op broadcasting its output over the batch
        # says so (capture.sites); otherwise its rows are read as samples flattened sample-major.
        suspect = not shared and rule.broadcastable and (
            rows != n_ids or (off_graph and bool(inputs) and _storage(inputs[0]) not in self.open.inputs))
        if shared:
            args, kwargs, output = expand_shared(name, module, args, kwargs, output, n_ids)
        cap = Capture(args=detach(args), kwargs=detach(kwargs), rng_state=self._rng_states.pop(name, None),
                      autocast=autocast_state(inputs) if rule.needs_rng else None)
        outputs = tensor_leaves(output)
        cap.grad_outputs = [None] * len(outputs)
        for j, out in enumerate(outputs):
            if out.requires_grad:
                out.register_hook(partial(self._store_grad, name, cap, j))
        self.open.captures.setdefault(name, []).append(cap)
        if shared:
            self.open.shared.append(name)
        elif suspect:
            self.open.suspects.append((name, cap, rows, off_graph))
            self._sites.watch_outputs(cap, outputs, n_ids)
        elif rows is None or rows % n_ids != 0:
            raise SampleIdError(
                f"module {name!r} ({type(module).__name__}) was called on an input with first dimension "
                f"{rows}, but the batch has {n_ids} sample ids: give one id per row of the batch"
            )
        else:
            self.open.rows_seen.add(rows)
            if off_graph:
                self.open.data_rows.add(rows)  # rows no expanded output can have produced
        return output if shared else None

    @staticmethod
    def _store_grad(name: str, cap: Capture, j: int, grad: Tensor) -> None:
        if cap.per_sample:  # gathered per sample at the broadcasting op: this is their sum
            if not residual_ok(grad, cap.grad_outputs[j]):
                raise SampleIdError(
                    f"the output of module {name!r}, called without the batch dimension, was used again "
                    "after it first met the batch (or by an operation that does not broadcast it over the "
                    "batch): only its first use is read per sample. Combine it with the batch once "
                    "(x = tok(idx) + pos(...)) and use the sum, or call the module on positions of shape "
                    "[1, T] (pos(torch.arange(T)[None])), which any number of uses broadcast exactly"
                )
            return
        prev = cap.grad_outputs[j]
        cap.grad_outputs[j] = grad.detach() if prev is None else prev + grad.detach()

    # ---------------------------------------------------------------- micro-batches
    def begin(self, ids) -> MicroBatch:
        """Open a micro-batch with sample ids ``ids`` (checked; closes one still open).

        Raises:
            SampleIdError: bad ids (an id may repeat, within the micro-batch or across the
                step's micro-batches: each occurrence is valued on its own row).
        """
        ids = as_sample_ids(ids)
        if self.open is not None:
            self.end()
        self.open = MicroBatch(ids)
        self.open_consumed = False
        self._sites.begin(self.open)
        return self.open

    def end(self) -> None:
        """Close the open micro-batch; kept for the next step if a gradient reached it."""
        self._sites.stop()
        mb = self.open
        self.open = None
        if mb is not None and not self.open_consumed and mb.complete:
            mb.check_rows()
            self.pending.append(mb)

    def step_batches(self) -> list[MicroBatch]:
        """The micro-batches a step now happening scores: pending, plus the open one unless scored."""
        batches = self.pending + ([self.open] if self.open is not None and not self.open_consumed else [])
        for mb in batches:
            mb.check_rows()
        return batches

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
