"""The validation objective whose loss decrease defines a sample's value.

``L_val(theta)`` is the mean of per-sample validation losses over the validation set, or over a
random sample of it drawn anew each optimizer step (``sample_size``), which costs less per step
and adds variance to each step's values. The same rows are used for everything computed at one
step (gradient and, for second order, the Hessian-vector product): the sample is a pure function
of (seed, step).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset, default_collate

from inrun_shapley.batches import map_tensors, move_to, rows_of, take_rows
from inrun_shapley.capture.registry import up
from inrun_shapley.engine.batched import batched_or_loop
from inrun_shapley.errors import ConfigurationError, NonFiniteError

LossFn = Callable[[nn.Module, Any], Tensor]


class _LossCall(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``torch.func.functional_call`` can evaluate
    it with the model's parameters replaced by other tensors (the model itself is untouched)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def parameter_values(model: nn.Module, params: Sequence[Tensor], at: Sequence[Tensor] | None = None,
                     point: Mapping[int, Tensor] | None = None):
    """Tensors standing in for the model's parameters in a validation pass, and the leaves of
    ``params`` to differentiate.

    Every parameter is replaced by a detached alias (no copy; ``requires_grad`` kept), ``params[i]``
    by ``at[i]`` when given, and any other parameter ``q`` by ``point[id(q)]`` when given. The user's parameters are never written, their ``.grad`` and
    hooks never touched.

    Returns:
        ``({qualified name: tensor}, [leaf per params[i]])``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    values = {n: p.detach().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # other parameters moved to a point (e.g. θ_t + Δ(G/2))
        if point is not None and id(p) in point:
            values[n] = point[id(p)].detach().requires_grad_(p.requires_grad)
    leaves = []
    for i, p in enumerate(params):
        if id(p) not in names:
            raise ConfigurationError("a tracked parameter is not a parameter of the model")
        name = names[id(p)]
        if at is not None:
            values[name] = at[i].detach().requires_grad_(True)
        else:
            values[name].requires_grad_(True)
        leaves.append(values[name])
    return values, leaves


def model_dtype(params) -> torch.dtype | None:
    """The one floating dtype of a model's parameters (a module, or an iterable of tensors);
    None when they have several (mixed precision: the loss function decides) or none."""
    tensors = params.parameters() if isinstance(params, nn.Module) else params
    dtypes = {p.dtype for p in tensors if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def cast_floating(batch, dtype: torch.dtype | None):
    """``batch`` with every floating tensor in ``dtype`` (no copy where it already is); integer
    and boolean tensors unchanged. ``dtype`` None: ``batch`` itself."""
    if dtype is None:
        return batch
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t, batch)


@contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class ValidationObjective:
    """Per-step validation loss for the tracker.

    Args:
        data: the validation set: a ``torch.utils.data.Dataset`` (rows collated with
            ``collate_fn``), or one in-memory batch: a tensor, a tuple/list of tensors or a dict of
            tensors sharing their first dimension.
        loss_fn: ``loss_fn(model, batch) -> Tensor``: per-sample losses ``[m]`` (preferred) or their
            mean (a scalar). Same convention as training: lower is better.
        sample_size: rows drawn (without replacement) per optimizer step; None uses the whole set.
        batch_size: rows per forward pass when going over the whole set.
        seed: seed of the per-step sampling.
        collate_fn: for Dataset inputs (default ``torch.utils.data.default_collate``).
        use_eval_mode: run the validation pass with the model in eval mode (dropout off).
    """

    def __init__(
        self,
        data,
        loss_fn: LossFn,
        *,
        sample_size: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        collate_fn: Callable | None = None,
        use_eval_mode: bool = True,
    ):
        if not callable(loss_fn):
            raise ConfigurationError("val_loss_fn must be callable as loss_fn(model, batch) -> per-sample losses")
        self.loss_fn = loss_fn
        self.use_eval_mode = use_eval_mode
        self.seed = seed
        self.batch_size = int(batch_size)
        if isinstance(data, Dataset) and not isinstance(data, (Tensor, tuple, list, dict)):
            self._dataset, self._batch = data, None
            self._n = len(data)
            self._collate = collate_fn or default_collate
        else:
            self._dataset, self._batch = None, data
            self._n = rows_of(data, "validation batch")
        if self._n == 0:
            raise ConfigurationError("the validation set is empty")
        if sample_size is not None and not (0 < sample_size <= self._n):
            raise ConfigurationError(f"val_sample_size must be in 1..{self._n} (the validation set size), got {sample_size}")
        self.sample_size = sample_size

    def __len__(self) -> int:
        return self._n

    def _rows(self, index: Tensor):
        if self._batch is not None:
            return take_rows(self._batch, index)
        return self._collate([self._dataset[int(i)] for i in index])

    def indices(self, step: int) -> Tensor:
        """Row indices used at ``step`` (the whole set, or that step's sample)."""
        if self.sample_size is None:
            return torch.arange(self._n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randperm(self._n, generator=g)[: self.sample_size].sort().values

    def chunks(self, step: int) -> Iterator[tuple[Any, int]]:
        """``(batch, rows)`` pieces covering the rows of ``step`` (the whole set's pieces are
        built once and kept: they are the same at every step)."""
        if self.sample_size is None and self.__dict__.get("_whole") is not None:
            yield from self._whole
            return
        idx = self.indices(step)
        pieces = []
        for start in range(0, len(idx), self.batch_size):
            part = idx[start : start + self.batch_size]
            pieces.append((self._rows(part), len(part)))
            yield pieces[-1]
        if self.sample_size is None:
            self._whole = pieces

    def per_sample_losses(self, model: nn.Module, batch, device, values: dict[str, Tensor] | None = None,
                          flags: list | None = None) -> Tensor:
        """``loss_fn`` on one batch, checked: returns ``[m]`` or a scalar.

        Floating tensors of the batch are cast to the model's parameter dtype (a float64
        validation set for a float32 model, as a data loader would yield); integer tensors
        (labels, token ids) are left as they are.

        ``values`` (from :func:`parameter_values`): evaluate with the model's parameters replaced
        by these tensors through ``torch.func.functional_call`` (the model is not written).

        ``flags``: a list to append a 0-d device flag (true: some loss is NaN or infinite) to,
        instead of reading it here (the tracker reads every flag of a step at once); None checks
        here and raises :class:`NonFiniteError`.
        """
        batch = cast_floating(move_to(batch, device), model_dtype(model if values is None else values.values()))
        if values is None:
            losses = self.loss_fn(model, batch)
        else:
            losses = functional_call(self._loss_call(model), {f"model.{n}": v for n, v in values.items()}, (batch,))
        if not isinstance(losses, Tensor):
            raise ConfigurationError(f"val_loss_fn must return a tensor, got {type(losses).__name__}")
        bad = ~torch.isfinite(losses.detach()).all()
        if flags is not None:
            flags.append(bad)
        elif bad:
            raise NonFiniteError(
                "the validation loss is NaN or infinite at this step; check val_loss_fn and the "
                "model (a diverging run makes every value meaningless)"
            )
        return losses

    def _loss_call(self, model: nn.Module) -> "_LossCall":
        """The ``functional_call`` wrapper of ``model``, built once per model."""
        call = self.__dict__.get("_call")
        if call is None or call.model is not model:
            call = self._call = _LossCall(model, self.loss_fn)
        return call

    def mean_loss(self, model: nn.Module, step: int, device, values: dict[str, Tensor] | None = None,
                  flags: list | None = None) -> Iterator[Tensor]:
        """Yields pieces of ``L_val`` (each already weighted) whose sum is the mean loss
        (``values``: parameters replaced, ``flags`` as in :meth:`per_sample_losses`)."""
        total = self.sample_size or self._n
        for batch, rows in self.chunks(step):
            losses = self.per_sample_losses(model, batch, device, values, flags)
            if losses.dim() == 0:
                yield losses * (rows / total)
            else:
                if losses.shape[0] != rows:
                    raise ConfigurationError(
                        f"val_loss_fn returned {losses.shape[0]} losses for a batch of {rows} rows; "
                        "return one loss per row (reduction='none') or a scalar mean"
                    )
                yield up(losses).sum() / total

    def gradient(self, model: nn.Module, params: Sequence[Tensor], step: int,
                 hvp_vectors: Sequence[Tensor] | None = None, at: Sequence[Tensor] | None = None,
                 point: Mapping[int, Tensor] | None = None, flags: list | None = None):
        """Gradient of ``L_val`` with respect to ``params``, without touching the model.

        The loss is evaluated through ``torch.func.functional_call`` on aliases of the
        parameters (:func:`parameter_values`): ``.grad``, the parameters' values and their
        hooks are left alone.

        Args:
            model: the model (called through ``loss_fn``).
            params: the parameters to differentiate with respect to.
            step: the optimizer step (selects the sample).
            hvp_vectors: if given (one tensor per param), also return the Hessian-vector product
                ``H_val @ v`` (second order).
            at: evaluate at these values of ``params`` (one tensor per param) instead of their
                current ones, e.g. the parameters before the step, read in the step post-hook.
            point: ``{id(parameter): value}`` for parameters not in ``params`` that are moved
                too (the ghost-path layers at the midpoint).
            flags: collect the non-finite flags on the device instead of reading them
                (:meth:`per_sample_losses`).

        Returns:
            list of gradients (fp32, zeros for unused params), and the HVP list or None.
        """
        device = params[0].device
        grads: list = [None] * len(params)  # the first piece's gradients become the accumulators
        hvps = [up(torch.zeros_like(p)) for p in params] if hvp_vectors is not None else None
        ctx = eval_mode(model) if self.use_eval_mode else _null()
        with ctx, torch.enable_grad():
            values, leaves = parameter_values(model, params, at, point)
            for piece in self.mean_loss(model, step, device, values, flags):
                g = torch.autograd.grad(piece, leaves, allow_unused=True, create_graph=hvp_vectors is not None)
                for i, gi in enumerate(g):
                    if gi is None:
                        continue
                    gi = up(gi.detach())
                    # out of place: autograd may hand back views or expanded tensors
                    grads[i] = gi if grads[i] is None else grads[i] + gi
                if hvp_vectors is not None:
                    used = [(i, gi) for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
                    if used:
                        dot = sum((gi * hvp_vectors[i].to(gi.dtype)).sum() for i, gi in used)
                        h = torch.autograd.grad(dot, leaves, allow_unused=True)
                        for acc, hi in zip(hvps, h):
                            if hi is not None:
                                acc += hi.to(acc.dtype)
        grads = [up(torch.zeros_like(p)) if gr is None else gr for p, gr in zip(params, grads)]
        return grads, hvps

    def query_gradients(self, model: nn.Module, params: Sequence[Tensor], observe=None, hvp_vectors=None, at=None,
                        point=None):
        """Gradient of every query's own loss: one ``[Q, *param.shape]`` tensor per parameter.

        Queries are the rows of the validation set (all of them, every step); a loss function
        returning ``[m, T]`` per-token losses makes each (row, token) a query (``Q = m·T``,
        row-major). One batched backward per chunk of rows (``is_grads_batched``), falling back
        to one backward per query for operations without a batching rule.

        ``observe``: called with each chunk's forward (a function of no arguments returning the
        chunk's per-query losses), it runs it and returns the losses; whoever scores some layers
        another way records what it needs from the same forward there (``params`` then holds
        only the parameters whose gradients are wanted here, possibly none).

        ``hvp_vectors`` (one tensor per param, second order): also return every query's
        Hessian-vector product ``H_q u`` (``[Q, *shape]`` per param), i.e. ``(grads, hvps)``.

        ``at``: evaluate at these values of ``params``, as in :meth:`gradient` (the model is never
        written either way).
        """
        if self.sample_size is not None:
            raise ConfigurationError("per-query values use every query at every step: leave val_sample_size=None")
        device = params[0].device if params else next(model.parameters()).device
        pieces: list[list[Tensor]] = [[] for _ in params]
        hvp_pieces: list[list[Tensor]] = [[] for _ in params]
        ctx = eval_mode(model) if self.use_eval_mode else _null()
        with ctx, torch.enable_grad():
            values, leaves = parameter_values(model, params, at, point)
            for batch, rows in self.chunks(0):
                def forward(batch=batch, rows=rows):
                    losses = self.per_sample_losses(model, batch, device, values)
                    if losses.dim() == 0 or losses.shape[0] != rows:
                        raise ConfigurationError(
                            "per-query values need val_loss_fn to return one loss per query row ([m]) or "
                            f"per-token losses ([m, T]); got shape {tuple(losses.shape)} for {rows} rows"
                        )
                    return losses

                losses = forward() if observe is None else observe(forward)
                if not params:
                    continue
                flat = up(losses).reshape(-1)
                if hvp_vectors is not None:
                    grads, hvps = _per_query_grads_and_hvps(flat, leaves, hvp_vectors)
                    for acc, h, prm in zip(hvp_pieces, hvps, params):
                        acc.append(up(torch.zeros(flat.numel(), *prm.shape, device=device)) if h is None else up(h))
                else:
                    grads = _per_query_grads(flat, leaves)
                for acc, g, prm in zip(pieces, grads, params):
                    acc.append(up(torch.zeros(flat.numel(), *prm.shape, device=device)) if g is None else up(g.detach()))
        grads = [torch.cat(acc) for acc in pieces]
        if hvp_vectors is not None:
            return grads, [torch.cat(acc) for acc in hvp_pieces]
        return grads

    def query_count(self, model: nn.Module, device) -> int:
        """Number of queries (rows, or rows × tokens for per-token losses)."""
        batch, _ = next(self.chunks(0))
        with torch.no_grad():
            per_row = self.per_sample_losses(model, batch, device)
        return len(self) * (per_row[0].numel() if per_row.dim() > 1 else 1)


def _per_query_grads(flat: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list:
    """``[Q, *shape]`` gradient of each entry of ``flat``: one batched backward, or (an op without
    a batching rule, warned once) one backward per query; out-of-memory errors are raised."""

    def batched():
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        return list(torch.autograd.grad(flat, params, grad_outputs=eye, is_grads_batched=True,
                                        allow_unused=True, retain_graph=True, create_graph=create_graph))

    def loop():
        per_q = [torch.autograd.grad(f, params, allow_unused=True, retain_graph=True, create_graph=create_graph)
                 for f in flat]
        return [None if per_q[0][i] is None else torch.stack([g[i] for g in per_q]) for i in range(len(params))]

    return batched_or_loop(batched, loop, "per-query validation gradients")


def _per_query_grads_and_hvps(flat: Tensor, params: Sequence[Tensor], vectors: Sequence[Tensor]):
    """Per-query gradients and ``H_q u`` (``u`` shared by all queries), one query at a time: a
    gradient with ``create_graph`` then the gradient of ``<g_q, u>``. A loop, not a batched
    backward: vmap through the double-backward graph measured ~700x slower (36.5 s vs 0.05 s for
    100 queries on a 5k-parameter MLP)."""
    grads: list[list] = [[] for _ in params]
    hvps: list[list] = [[] for _ in params]
    for f in flat:
        g = torch.autograd.grad(f, params, allow_unused=True, retain_graph=True, create_graph=True)
        dot = sum((gi * v.to(gi.dtype)).sum() for gi, v in zip(g, vectors) if gi is not None)
        h = (torch.autograd.grad(dot, params, allow_unused=True, retain_graph=True)
             if isinstance(dot, Tensor) and dot.requires_grad else [None] * len(params))
        for i in range(len(params)):
            grads[i].append(None if g[i] is None else g[i].detach())
            hvps[i].append(None if h[i] is None else h[i].detach())
    stack = lambda items: None if items[0] is None else torch.stack(items)  # noqa: E731
    return [stack(gs) for gs in grads], [stack(hs) for hs in hvps]


@contextmanager
def _null():
    yield
