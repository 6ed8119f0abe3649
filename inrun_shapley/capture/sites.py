"""Per-sample gradients read where a batch-less tensor meets the batch (its "use site").

Two kinds of tensor take part in a batch without carrying its sample dimension:

* the output of a tracked module called without the batch (nanoGPT's ``wpe(torch.arange(T))``,
  ``[T, d]``, added to ``wte(idx)``, ``[B, T, d]``);
* a raw parameter of a module that also has child modules (a ViT's ``pos_embed`` added to the
  patch tokens, its ``cls_token`` expanded to the batch, a block's layer-scale ``gamma``).

The gradient reaching such a tensor is already summed over the samples (the broadcast's backward
sums it), but the gradient reaching the op that broadcasts it is still per sample.
:class:`BroadcastWatch`, a ``TorchFunctionMode`` pushed only while a tracked micro-batch runs and
only for models that have such tensors, catches that op: an elementwise op whose operands
broadcast a watched tensor along a new leading dimension of the batch's size ``n`` (or along a
leading dimension of 1), and ``expand``/``expand_as`` calls that do the same; a watched module
output passed first through a view or a cast that keeps its elements in order (``[None]``,
``unsqueeze(0)``, ``view``, ``to(dtype)``) or through basic indexing (``pos(arange(L))[:T]``)
is followed through it. It replaces the
watched operand by the same values expanded to the broadcast shape (a view: the op's result is
identical) and hooks the expanded tensor; the hook's gradient, summed over the other broadcast
dimensions (:func:`per_sample_sum`), is each sample's gradient with respect to the watched
tensor, ``[n, *shape]``. No shape is ever read as rows: a tensor only counts as batch-less when
an op is seen broadcasting it over the batch.

:class:`ParameterSiteRule` scores raw parameters from those per-sample gradients (exact at any
learning rate: nothing is replayed, so child modules never run at the post-step weights).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from inrun_shapley.capture.registry import Capture, CaptureRule, project, up

__all__ = ["BroadcastWatch", "PARAMETER_SITE_RULE", "ParameterSiteRule", "per_sample_sum", "residual_ok"]

# Elementwise ops (by ``__name__``, functions and Tensor methods alike) whose operands broadcast.
_ELEMENTWISE = frozenset(
    f"{p}{op}{s}" for op in ("add", "sub", "mul", "div", "truediv", "true_divide")
    for p, s in (("", ""), ("", "_"), ("__", "__"), ("__r", "__"), ("__i", "__"))
) | frozenset({"where", "addcmul", "addcdiv", "lerp", "maximum", "minimum", "multiply", "subtract"})
_EXPANDS = frozenset({"expand", "expand_as"})
# Ops that keep every element in order (a view or a cast): a watched module output passed
# through them stays watched (``pos(torch.arange(T))[None]``, ``.unsqueeze(0)``, ``.to(dtype)``).
_SAME_ELEMENTS = frozenset({"view", "reshape", "unsqueeze", "squeeze", "flatten", "__getitem__", "contiguous",
                            "to", "float", "half", "bfloat16", "double", "type_as", "clone"})


def per_sample_sum(grad: Tensor, shape: torch.Size, n: int) -> Tensor:
    """``[n, *shape]``: the gradient ``grad`` of a tensor of ``shape`` expanded to ``grad.shape``
    (``grad.shape[0] == n``), summed per sample over every other broadcast dimension.

    ``shape`` is aligned to the trailing dimensions of ``grad``; it either lacks the leading
    dimension or has size 1 there.
    """
    lead = grad.dim() - len(shape)
    core = tuple(shape) if lead >= 1 else tuple(shape[1:])
    lead = max(lead, 1)
    if lead > 1:
        grad = grad.sum(dim=tuple(range(1, lead)))
    dims = [i + 1 for i, (a, b) in enumerate(zip(core, grad.shape[1:])) if a == 1 and b != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(n, *shape)


def residual_ok(total: Tensor, per_sample: Tensor | None) -> bool:
    """Whether the per-sample gradients gathered at the use sites add up to the tensor's whole
    gradient ``total`` (else some use did not broadcast over the batch and was missed)."""
    if total.numel() == 0:
        return True
    half = any(t is not None and t.dtype in (torch.float16, torch.bfloat16) for t in (total, per_sample))
    total = up(total.detach())
    rest = total if per_sample is None else total - up(per_sample).sum(0)
    tol = 5e-2 if half else 1e-4
    return bool(rest.abs().max() <= tol * total.abs().max())


class Watched:
    """A watched tensor: what to do when a use site broadcasts it over the batch.

    Args:
        tensor: the watched tensor (kept alive while watched, so its ``id`` stays its own).
        on_site: called once per use site at forward time (may raise to refuse the use).
        on_grad: called during backward with the use site's ``[n, *shape]`` per-sample gradient.
        once: stop watching after the first use site (a module output; a later use of it is
            then caught by the check on its whole gradient instead of being read).
    """

    __slots__ = ("tensor", "on_site", "on_grad", "once")

    def __init__(self, tensor: Tensor, on_site: Callable[[], None], on_grad: Callable[[Tensor], None],
                 once: bool = False):
        self.tensor, self.on_site, self.on_grad, self.once = tensor, on_site, on_grad, once


def _reshaped(on_grad: Callable[[Tensor], None], shape) -> Callable[[Tensor], None]:
    """``on_grad`` of a tensor of ``shape``, fed the per-sample gradient of a same-elements view of it."""
    return lambda g: on_grad(g.reshape(g.shape[0], *shape))


def _basic(key) -> bool:
    """Basic indexing only (ints, slices, None, Ellipsis): the backward puts the gradient back in place."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, slice)) for k in keys)


def _indexed(on_grad: Callable[[Tensor], None], source: Tensor, key) -> Callable[[Tensor], None]:
    """``on_grad`` of ``source``, fed the per-sample gradient of ``source[key]`` (zero elsewhere)."""
    shape, keys = source.shape, key if isinstance(key, tuple) else (key,)

    def put(g: Tensor) -> None:
        full = g.new_zeros(g.shape[0], *shape)
        full[(slice(None),) + keys] = g
        on_grad(full)

    return put


class BroadcastWatch(TorchFunctionMode):
    """Expands watched tensors at the op that broadcasts them over the batch, and hooks them.

    Attributes:
        n: the open micro-batch's number of samples.
        watched: ``{id(tensor): Watched}``.
        enabled: a callable telling whether a micro-batch is being captured right now.
    """

    def __init__(self, enabled: Callable[[], bool]):
        super().__init__()
        self.n = 0
        self.watched: dict[int, Watched] = {}
        self.enabled = enabled
        self.on_stack = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched and self.enabled():
            name = getattr(func, "__name__", None)
            if name in _ELEMENTWISE:
                args, kwargs = self._elementwise(args, kwargs)
            elif name in _EXPANDS and args and isinstance(args[0], Tensor):
                w = self._find(args[0])
                if w is not None:
                    out = func(*args, **kwargs)
                    if out.dim() > 0 and out.shape[0] == self.n and self._broadcasts(args[0].shape, out.shape):
                        self._hook(w, out, args[0].shape)
                    return out
            elif name in _SAME_ELEMENTS and args and isinstance(args[0], Tensor):
                w = self._find(args[0])
                if w is not None and w.once:
                    out = func(*args, **kwargs)
                    if isinstance(out, Tensor) and out.requires_grad:
                        if out.numel() == args[0].numel():
                            self.watched[id(out)] = Watched(out, w.on_site, _reshaped(w.on_grad, args[0].shape),
                                                            once=True)
                        elif name == "__getitem__" and _basic(args[1]):  # pos(arange(L))[:T]
                            self.watched[id(out)] = Watched(out, w.on_site, _indexed(w.on_grad, args[0], args[1]),
                                                            once=True)
                    return out
        return func(*args, **kwargs)

    def _find(self, t) -> Watched | None:
        w = self.watched.get(id(t)) if isinstance(t, Tensor) else None
        return w if w is not None and w.tensor is t else None

    def _broadcasts(self, shape, to) -> bool:
        """``shape`` is spread over the leading (sample) dimension of ``to``."""
        return len(to) > len(shape) or (len(shape) > 0 and shape[0] == 1 and self.n > 1)

    @property
    def idle(self) -> bool:
        """Nothing left to watch: the mode may leave the stack (it costs every op a Python call)."""
        return not self.watched

    def _hook(self, w: Watched, expanded: Tensor, shape) -> None:
        w.on_site()
        if w.once:
            self.watched.pop(id(w.tensor), None)
        if expanded.requires_grad:
            n = self.n
            expanded.register_hook(lambda g: w.on_grad(per_sample_sum(g.detach(), shape, n)))

    def _elementwise(self, args, kwargs):
        slots = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
        slots += [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor)]
        hits = [(slot, t, w) for slot, t in slots if (w := self._find(t)) is not None]
        if not hits or len(slots) < 2:
            return args, kwargs
        try:
            shape = torch.broadcast_shapes(*(t.shape for _, t in slots))
        except RuntimeError:
            return args, kwargs
        if len(shape) == 0 or shape[0] != self.n:
            return args, kwargs
        args, kwargs = list(args), dict(kwargs)
        for slot, t, w in hits:
            if not self._broadcasts(t.shape, shape):
                if w.once and tuple(t.shape) == tuple(shape):
                    # a module output that met the batch row for row: it carries the samples, its
                    # rows are read as such; nothing is left to catch for it (the mode may leave)
                    self.watched.pop(id(t), None)
                continue
            expanded = t.expand(shape)
            self._hook(w, expanded, t.shape)
            if isinstance(slot, int):
                args[slot] = expanded
            else:
                kwargs[slot] = expanded
        return tuple(args), kwargs

    def push(self, n: int) -> None:
        """Watch ops from now on, for a micro-batch of ``n`` samples."""
        self.n = n
        if not self.on_stack:
            self.__enter__()
            self.on_stack = True

    def pop(self) -> None:
        """Stop watching and forget the watched tensors.

        The mode leaves the stack only from the top: called while torch runs one of its handlers
        (the stack is popped meanwhile, e.g. a hook ending the micro-batch inside ``backward``)
        or under a mode pushed later, it stays, watching nothing, until the next call.
        """
        self.watched.clear()
        if self.on_stack:
            stack = torch.overrides._get_current_function_mode_stack()
            if stack and stack[-1] is self:
                self.on_stack = False
                self.__exit__(None, None, None)


class ParameterSiteRule(CaptureRule):
    """Raw parameters of a module that has children (``pos_embed``, ``cls_token``, a block's
    layer-scale ``gamma``), scored from per-sample gradients gathered at their use sites.

    The capture's ``grad_outputs`` hold, in :meth:`parameters` order, each parameter's
    ``[n, *shape]`` per-sample gradient (None for a parameter that met no sample); the dot
    product is ``<g_n, M>`` (these parameters are small: position tables, tokens, scales).
    A use that does not broadcast the parameter over the batch (slicing it, interpolating it,
    a matrix product) leaves part of its gradient unassigned; the capture session then refuses
    the batch rather than miss it.
    """

    kind = "parameter-sites"
    broadcastable = False

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        out = None
        grads = [(name, g) for name, g in zip(self.parameters(module), capture.grad_outputs) if g is not None]
        for name, g in grads:
            if name in directions:
                part = project(up(g), directions[name])
                out = part if out is None else out + part
        if out is None:  # only parameters without a direction met the samples
            m = next(iter(directions.values()))
            return torch.zeros(grads[0][1].shape[0], m.shape[0], dtype=up(m).dtype, device=m.device)
        return out


PARAMETER_SITE_RULE = ParameterSiteRule()
