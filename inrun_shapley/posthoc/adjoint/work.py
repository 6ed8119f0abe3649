"""The model side of the adjoint pass: a private copy of the model set from flat parameter
vectors, the batch terms (gradient, Hessian-vector products, per-sample dot products) and the
query gradients."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.trajectory import Recording


def cast(obj, dtype):
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast(v, dtype) for k, v in obj.items()}
    return obj


def rows_of(train_data, ids: np.ndarray):
    """The batch rows of ``ids``: ``train_data(ids)`` if callable, ``tuple(t[ids])`` for a tuple or
    list of tensors, ``{k: t[ids]}`` for a dict of tensors, else ``train_data[ids]``."""
    idx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if callable(train_data) and not isinstance(train_data, (Tensor, nn.Module)):
        return train_data(idx)
    if isinstance(train_data, (tuple, list)):
        return type(train_data)(t[idx] for t in train_data)
    if isinstance(train_data, dict):
        return {k: v[idx] for k, v in train_data.items()}
    return train_data[idx]


class Work:
    """A private copy of the model whose parameters are set from flat vectors; the batch terms."""

    def __init__(self, model: nn.Module, rec: Recording, dtype: torch.dtype, loss_fn, reduction, query_block):
        self.model = copy.deepcopy(model).to(dtype)
        named = dict(self.model.named_parameters())
        self.params = [named[n] for n in rec.names]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.numels, self.shapes = rec.numels, rec.shapes
        self.dtype, self.loss_fn, self.reduction, self.query_block = dtype, loss_fn, reduction, query_block

    def load(self, theta: Tensor) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, theta.split(self.numels)):
                p.copy_(t.view_as(p))

    def split(self, a: Tensor) -> list[Tensor]:
        return [x.reshape(a.shape[0], *s) for x, s in zip(a.split(self.numels, dim=1), self.shapes)]

    @staticmethod
    def flat(parts, like: list[Tensor], batch: int | None = None) -> Tensor:
        out = []
        for g, p in zip(parts, like):
            if g is None:
                g = torch.zeros((batch, *p.shape) if batch else p.shape, dtype=p.dtype)
            out.append(g.reshape(batch, -1) if batch else g.reshape(-1))
        return torch.cat(out, dim=1 if batch else 0)

    def terms(self, theta: Tensor, rows, a: Tensor | None = None, weights: Tensor | None = None):
        """Gradient ``Σ_i c_i`` at ``theta``; with directions ``a [Q, P]`` also ``H a [Q, P]`` and
        ``⟨c_i, a_q⟩ [Q, B]`` (H = Hessian of the reduced batch loss). ``weights [B]`` multiplies
        each row's loss term, the reduction's denominator unchanged (a counterfactual replay)."""
        self.load(theta)
        with torch.enable_grad():
            losses = self.loss_fn(self.model, rows)
            if not isinstance(losses, Tensor) or losses.dim() != 1:
                raise ConfigurationError(
                    f"loss_fn(model, batch) must return per-sample losses [B], got "
                    f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}"
                )
            b = losses.shape[0]
            w = torch.full((b,), 1.0 / b if self.reduction == "mean" else 1.0, dtype=losses.dtype,
                           requires_grad=a is not None)
            if weights is not None:
                w = (w * weights.to(w.dtype)).detach().requires_grad_(a is not None)
            grads = torch.autograd.grad((w * losses).sum(), self.params, create_graph=a is not None,
                                        allow_unused=True)
            g = self.flat([None if x is None else x.detach() for x in grads], self.params)
            if a is None:
                return g, None, None
            live = [i for i, x in enumerate(grads) if x is not None and x.requires_grad]
            outs_h, outs_d = [], []
            for blk in a.split(self.query_block or a.shape[0]):
                parts = self.split(blk)
                res = torch.autograd.grad(
                    [grads[i] for i in live], self.params + [w], grad_outputs=[parts[i] for i in live],
                    is_grads_batched=True, retain_graph=True, allow_unused=True,
                )
                outs_h.append(self.flat(res[:-1], self.params, blk.shape[0]))
                d = res[-1] if res[-1] is not None else torch.zeros(blk.shape[0], b, dtype=blk.dtype)
                outs_d.append(d * w.detach())  # ⟨∇ℓ_i, a⟩ · w_i = ⟨c_i, a⟩
        return g, torch.cat(outs_h), torch.cat(outs_d)


def check_model(model: nn.Module, rec: Recording) -> None:
    have = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = dict(zip(rec.names, rec.shapes))
    missing = [n for n in want if n not in have]
    wrong = [f"{n}: recorded {want[n]}, model {have[n]}" for n in want if n in have and have[n] != want[n]]
    if missing or wrong:
        raise ConfigurationError(
            "the model does not match the recording (queries for a different model?):"
            + (f" parameters missing from the model: {missing};" if missing else "")
            + (f" shapes differ: {wrong};" if wrong else "")
            + " pass the architecture that was trained when the recording was made"
        )


def query_gradients(work: Work, theta: Tensor, output_fn, queries, block) -> Tensor:
    work.load(theta)
    with torch.enable_grad():
        out = output_fn(work.model, queries)
        if not isinstance(out, Tensor) or out.dim() != 1:
            raise ConfigurationError(
                f"output_fn(model, queries) must return one value per query [Q], got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        q = out.shape[0]
        eye = torch.eye(q, dtype=out.dtype)
        parts = []
        for blk in eye.split(block or q):
            res = torch.autograd.grad(out, work.params, grad_outputs=blk, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
            parts.append(Work.flat(res, work.params, blk.shape[0]))
    return torch.cat(parts)
