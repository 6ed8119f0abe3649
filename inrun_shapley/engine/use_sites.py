"""The capture session's use-site watch: per-sample gradients of tensors that lack the batch.

Two kinds of tracked tensor meet the batch without carrying its sample dimension (see
:mod:`~inrun_shapley.capture.sites`): outputs of tracked calls that may lack it (the session's
"suspects": rows other than the samples, or inputs built inside the model such as
``torch.arange(T)``), and raw parameters of modules that also have children. :class:`UseSites`
pushes the :class:`~inrun_shapley.capture.sites.BroadcastWatch` mode during the model's forward
of a captured micro-batch, only when the model has such tensors (it probes the first forward,
then stays off for models without them), and gathers their per-sample gradients into the
micro-batch's captures.

A parameter's gradient must be fully accounted for by its use sites: a hook on the parameter
compares its whole gradient with the sum of the per-sample ones and refuses the batch when a
use did not broadcast it over the batch (the part it received would belong to nobody).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping

from torch import Tensor

from inrun_shapley.capture import Capture
from inrun_shapley.capture.sites import BroadcastWatch, ParameterSiteRule, Watched, residual_ok
from inrun_shapley.capture.outputs import map_outputs
from inrun_shapley.errors import SampleIdError, UnsupportedModuleError

__all__ = ["UseSites", "expand_shared"]


class UseSites:
    """Watch of one capture session.

    Args:
        modules: the session's tracked modules; those with a
            :class:`~inrun_shapley.capture.sites.ParameterSiteRule` are read at their use sites.
        capturing: whether a micro-batch is being captured right now.
        suspended: whether the session is paused (the tracker's own passes).
    """

    def __init__(self, modules: Mapping, capturing: Callable[[], bool], suspended: Callable[[], bool]):
        self.modules = {name: t for name, t in modules.items() if isinstance(t.rule, ParameterSiteRule)}
        self._watch = BroadcastWatch(capturing)
        self._suspended = suspended
        self._needed: bool | None = True if self.modules else None  # None: probe the next micro-batch
        self._depth = 0  # forwards under way (the model's, and those of modules holding watched parameters)
        self._handles: list = []
        self._totals: dict = {}

    def begin(self, mb) -> None:
        """A micro-batch opens: one capture per module collects its raw parameters' per-sample
        gradients, and a hook on each parameter checks that every use of it was seen (also
        when the model's own forward is bypassed and nothing watched the parameters)."""
        for name, tracked in self.modules.items():
            cap = Capture(args=(), kwargs={}, grad_outputs=[None] * len(tracked.params))
            mb.captures[name] = [cap]
            for j, (pname, p) in enumerate(tracked.params.items()):
                if p.requires_grad:
                    self._handles.append(p.register_hook(partial(self._check, name, pname, cap, j)))

    def forward_start(self, mb, n: int) -> None:
        """The model's forward, or the forward of a module holding watched parameters, starts on
        micro-batch ``mb`` of ``n`` samples: watch it if the model needs it (the first forward
        is a probe). Nested calls count: the watch ends with the outermost one."""
        self._depth += 1
        if self._needed is not False:
            self._watch.push(n)
            for name, tracked in self.modules.items():
                cap = mb.captures[name][0]
                for j, p in enumerate(tracked.params.values()):
                    if p.requires_grad and id(p) not in self._watch.watched:
                        self._watch.watched[id(p)] = Watched(p, _nothing, partial(_add, cap, j))

    def forward_end(self) -> None:
        """The forward that :meth:`forward_start` saw returned: at the outermost one every
        broadcast over the batch has happened."""
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        if self._needed is None:  # probed one forward: nothing to watch in this model
            self._needed = False
        self._watch.pop()

    def stop(self) -> None:
        """The micro-batch closed: stop watching, drop the parameter hooks."""
        self._depth = 0
        self._watch.pop()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._totals.clear()

    def watch_outputs(self, cap: Capture, outputs: list[Tensor], n: int) -> None:
        """A tracked call that may lack the batch: watch its floating outputs."""
        self._needed = True
        if not self._watch.on_stack:  # first seen inside a forward: watch from here on
            self._watch.push(n)
        for j, out in enumerate(outputs):
            if out.requires_grad and out.is_floating_point():
                self._watch.watched[id(out)] = Watched(out, partial(_lacks_batch, cap, n), partial(_add, cap, j),
                                                       once=True)

    def settle(self) -> None:
        """Leave the op stream once nothing is watched (outputs met the batch, no raw parameters):
        called from module hooks, outside the mode's handler."""
        if self._watch.on_stack and self._watch.idle:
            self._watch.pop()

    def _check(self, name: str, pname: str, cap: Capture, j: int, grad: Tensor) -> None:
        if self._suspended():
            return
        key = (id(cap), j)
        total = grad.detach() if key not in self._totals else self._totals[key] + grad.detach()
        self._totals[key] = total
        if not residual_ok(total, cap.grad_outputs[j]):
            raise UnsupportedModuleError(
                f"parameter {pname!r} of module {name or '<root>'!r} ({type(self.modules[name].module).__name__}) "
                "was used by an operation that does not broadcast it over the batch (slicing, "
                "interpolation, a matrix product): its per-sample gradients cannot be read at its use "
                "sites. Use it through an elementwise operation with the batch (x + p, x * p) or "
                "p.expand(batch, ...), move it into a child module called on the batch, or pass "
                f"exclude=[{name!r}]"
            )


def _nothing() -> None:
    return None


def _lacks_batch(cap: Capture, n: int) -> None:
    """An op broadcast the call's output over the batch: read its first tensor input as shared by
    the ``n`` samples (an expanded view), its output gradients per sample at that op."""
    if cap.per_sample:
        return
    cap.per_sample = True

    def expand(batch, done):
        out = []
        for t in batch:
            if not done and isinstance(t, Tensor) and t.dim() > 0:
                t, done = t.unsqueeze(0).expand(n, *t.shape), True
            out.append(t)
        return out, done

    args, done = expand(cap.args, False)
    values, _ = expand(cap.kwargs.values(), done)
    cap.args, cap.kwargs = tuple(args), dict(zip(cap.kwargs, values))


def _add(cap: Capture, j: int, grad: Tensor) -> None:
    prev = cap.grad_outputs[j]
    cap.grad_outputs[j] = grad if prev is None else prev + grad


def expand_shared(name: str, module, args, kwargs, output, n: int):
    """A call shared by the ``n`` samples (leading dimension 1): its first tensor input and its
    outputs expanded from ``[1, ...]`` to ``[n, ...]`` (views; an output another hook already
    expanded stays), so that every use of the output is per sample."""

    def expand(t: Tensor) -> Tensor:
        if t.dim() > 0 and t.shape[0] == 1:
            return t.expand(n, *t.shape[1:])
        if t.dim() > 0 and t.shape[0] == n or not t.is_floating_point():
            return t
        raise SampleIdError(
            f"module {name!r} ({type(module).__name__}) was called on one row shared by the "
            f"batch's {n} samples, but returned a tensor of shape {tuple(t.shape)}: a shared "
            "module must keep the leading dimension of 1 in its outputs"
        )

    args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            args[i] = a.expand(n, *a.shape[1:])
            break
    else:
        kwargs = dict(kwargs)
        key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
        kwargs[key] = kwargs[key].expand(n, *kwargs[key].shape[1:])
    return tuple(args), kwargs, map_outputs(expand, output)
