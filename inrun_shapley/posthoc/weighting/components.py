"""Per-group parts ``C_j(i, q)`` of a gradient-similarity score, computed once and cached.

For checkpoints ``c`` with weights ``η_c`` and optional diagonal preconditioners ``P_c``::

    C_j(i, q) = Σ_c η_c · ⟨R_j g_q^{c,j}, R_j (P_c^j ⊙ g_i^{c,j})⟩

with ``g^{c,j}`` the per-sample loss gradient restricted to parameter group ``j`` and ``R_j`` an
optional per-group random projection. Summed over ``j`` it is the unweighted TracIn-style score.
Shapes ``[G, n_train, n_query]``; positive = a gradient step on training sample ``i`` lowers
query ``q``'s loss (first order).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.loss_convention import model_batch_loss
from inrun_shapley.posthoc.weighting.grad_dot import grad_dot_components
from inrun_shapley.posthoc.weighting.groups import ParameterGroups, check_unique_names, listing

StateDict = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(model, batch) -> [B]`` per-sample losses (or their mean), ``batch = (inputs, targets)``."""

_COMPONENTS_FORMAT = "inrun-shapley/group-components"


@dataclass
class GroupComponents:
    """Per-group parts of a gradient-similarity score.

    Attributes:
        values: ``[G, n_train, n_query]`` float64; ``values[j, i, q] = C_j(i, q)``. Summed over
            ``j`` it is the unweighted score (exact for the dot product and diagonal
            preconditioners; for projections it is the projected score).
        group_names: the ``G`` group names, in the order of ``values``' first axis.
        method: how they were computed (``"grad_dot"``, ``"grad_dot+precond"``, with
            ``"+proj{k}"`` when projected, or anything for user-built components).
        fingerprint: hash of the inputs they were computed from (empty for user-built ones).
    """

    values: np.ndarray
    group_names: tuple[str, ...]
    method: str = "custom"
    fingerprint: str = ""

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        self.group_names = tuple(str(g) for g in self.group_names)
        if self.values.ndim != 3:
            raise ConfigurationError(
                f"components must be [G, n_train, n_query], got shape {self.values.shape}"
            )
        if self.values.shape[0] != len(self.group_names):
            raise ConfigurationError(
                f"components have {self.values.shape[0]} groups but {len(self.group_names)} "
                "group names were given"
            )
        check_unique_names(self.group_names)

    @property
    def n_groups(self) -> int:
        return self.values.shape[0]

    @property
    def n_train(self) -> int:
        return self.values.shape[1]

    @property
    def n_query(self) -> int:
        return self.values.shape[2]

    def total(self) -> np.ndarray:
        """Unweighted score ``Σ_j C_j``: ``[n_train, n_query]``."""
        return self.values.sum(axis=0)

    def select_queries(self, index) -> GroupComponents:
        """Components restricted to some queries (``index`` into the last axis)."""
        return GroupComponents(self.values[:, :, index], self.group_names, self.method, "")

    def save(self, path: str | os.PathLike) -> None:
        """Write to an ``.npz`` file (no pickle)."""
        np.savez(
            path,
            format=np.array(_COMPONENTS_FORMAT),
            values=self.values,
            group_names=np.array(self.group_names, dtype=str),
            method=np.array(self.method),
            fingerprint=np.array(self.fingerprint),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> GroupComponents:
        """Read components written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data or str(data["format"]) != _COMPONENTS_FORMAT:
                raise ConfigurationError(f"{path} is not a group-components file written by save()")
            return cls(
                values=data["values"],
                group_names=tuple(str(g) for g in data["group_names"]),
                method=str(data["method"]),
                fingerprint=str(data["fingerprint"]),
            )


def _checked_loss(model: nn.Module, fn: Callable, what: str, probe: tuple) -> Callable:
    """``fn`` as ``fn(model, batch)`` (deprecated spellings converted), tried once on ``probe``
    with the model in eval mode (its modes restored)."""
    modes = {name: mod.training for name, mod in model.named_modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model_batch_loss(fn, what, probe=(model, probe))
    finally:
        for name, mod in model.named_modules():
            mod.train(modes[name])


def compute_group_components(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    groups: ParameterGroups | str | Mapping[str, Sequence[str]] = "tensor",
    *,
    checkpoints: Sequence[StateDict | str | os.PathLike] | None = None,
    lrs: Sequence[float] | None = None,
    preconditioner: StateDict | Sequence[StateDict | None] | None = None,
    projection_dim: int | None = None,
    query_loss_fn: LossFn | None = None,
    batch_size: int = 256,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
) -> GroupComponents:
    """Per-group gradient dot products (TracIn-style), optionally preconditioned or projected.

    For checkpoints ``c`` with weights ``η_c`` and optional diagonal preconditioners ``P_c``:

        C_j(i, q) = Σ_c η_c · ⟨R_j g_q^{c,j}, R_j (P_c^j ⊙ g_i^{c,j})⟩

    with ``g^{c,j}`` the per-sample loss gradient restricted to group ``j`` at checkpoint ``c``
    (``torch.func.vmap(grad(...))`` in batches of ``batch_size``) and ``R_j`` a per-group
    Gaussian projection to ``projection_dim`` dimensions (identity when ``projection_dim`` is
    None or ≥ the group's size). Without projection ``Σ_j C_j`` equals the full dot product
    exactly; with projection each group is projected separately, so the split stays exact for
    the projected score. Gradients are taken in the parameters' dtype, products accumulated in
    float64. The model is put in eval mode during the computation and restored afterwards; its
    parameters are never modified (checkpoints go through ``torch.func.functional_call``).

    Args:
        model: the model; ``model(x)`` for a batch of inputs.
        loss_fn: ``fn(model, batch) -> [B]`` per-sample losses (or their mean) with ``batch =
            (inputs, targets)``, as everywhere in the library. The old ``loss(outputs,
            targets)`` spelling still works for one release, with a ``DeprecationWarning``.
        train: ``(inputs [n_train, ...], targets [n_train, ...])``.
        query: ``(inputs [n_query, ...], targets [n_query, ...])``.
        groups: the parameter groups (see :meth:`ParameterGroups.resolve`).
        checkpoints: state dicts or paths to ``torch.save``-d state dicts (a top-level
            ``"state_dict"`` entry is used when present); default: the model's current weights.
            Missing trainable parameters are an error; missing buffers use the model's.
        lrs: weight ``η_c`` of each checkpoint (e.g. its learning rate); default 1 each.
        preconditioner: ``{parameter name: P}`` (shaped like the parameter, e.g. from
            :func:`adam_preconditioner`) used for every checkpoint, or one per checkpoint.
        projection_dim: per-group random projection size, or None for exact products.
        query_loss_fn: ``fn(model, batch)`` loss for the queries (default ``loss_fn``); return
            minus a quantity that should rise, e.g. ``-margin``, to attribute that quantity.
        batch_size: samples per ``vmap`` call.
        seed: seeds the projections.
        cache_path: ``.npz`` file. If it exists and was computed from the same inputs it is
            loaded instead of recomputed; if it does not exist the result is written there.

    Returns:
        :class:`GroupComponents` with ``values [G, n_train, n_query]`` (positive = a step on
        ``i`` lowers ``q``'s query loss).

    Raises:
        ConfigurationError: bad groups, checkpoints, preconditioners or shapes; a cache file
            computed from other inputs.
    """
    groups = ParameterGroups.resolve(model, groups)
    x_tr, y_tr = train
    x_q, y_q = query
    loss_fn = _checked_loss(model, loss_fn, "loss_fn", (x_tr[:1], y_tr[:1]))
    query_loss_fn = loss_fn if query_loss_fn is None else _checked_loss(model, query_loss_fn, "query_loss_fn",
                                                                          (x_q[:1], y_q[:1]))
    if len(x_tr) != len(y_tr) or len(x_q) != len(y_q):
        raise ConfigurationError(
            f"inputs and targets differ in length: train {len(x_tr)} vs {len(y_tr)}, "
            f"query {len(x_q)} vs {len(y_q)}"
        )
    if projection_dim is not None and projection_dim < 1:
        raise ConfigurationError(f"projection_dim must be >= 1 or None, got {projection_dim}")
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")

    states, lrs, preconds = _resolve_checkpoints(model, groups, checkpoints, lrs, preconditioner)
    method = "grad_dot" + ("+precond" if any(p is not None for p in preconds) else "")
    method += f"+proj{projection_dim}" if projection_dim is not None else ""
    fingerprint = _fingerprint(
        [method, groups.to_dict(), lrs, seed, batch_size], [x_tr, y_tr, x_q, y_q], groups, states, preconds
    )

    if cache_path is not None and Path(cache_path).exists():
        cached = GroupComponents.load(cache_path)
        if cached.fingerprint != fingerprint:
            raise ConfigurationError(
                f"cache {cache_path} was computed from other inputs (model, data, checkpoints, "
                "groups or options differ); delete it or choose another cache_path."
            )
        return cached

    values = grad_dot_components(
        model, loss_fn, query_loss_fn, (x_tr, y_tr), (x_q, y_q), groups, states, lrs, preconds,
        projection_dim, batch_size, seed,
    )
    result = GroupComponents(values, groups.names, method, fingerprint)
    if cache_path is not None:
        result.save(cache_path)
    return result


def _load_state(ckpt: StateDict | str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """A state dict, or one read from a ``torch.save`` file (its ``"state_dict"`` entry if any)."""
    if isinstance(ckpt, (str, os.PathLike)):
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        return obj
    return ckpt


def _resolve_checkpoints(
    model: nn.Module,
    groups: ParameterGroups,
    checkpoints: Sequence[StateDict | str | os.PathLike] | None,
    lrs: Sequence[float] | None,
    preconditioner: StateDict | Sequence[StateDict | None] | None,
) -> tuple[list[Mapping[str, torch.Tensor]], list[float], list[StateDict | None]]:
    """Checkpoint states, their weights ``η_c`` and preconditioners, one entry per checkpoint.

    Raises:
        ConfigurationError: no checkpoint, lists of other lengths, a checkpoint without some
            trainable parameter, a preconditioner missing a parameter or shaped otherwise.
    """
    named = dict(model.named_parameters())
    trainable = list(groups.param_names)
    if checkpoints is None:
        states = [{n: named[n].detach() for n in trainable}]
    else:
        states = [_load_state(c) for c in checkpoints]
        if not states:
            raise ConfigurationError("checkpoints is empty; pass None to use the current weights")
    lrs = [1.0] * len(states) if lrs is None else [float(v) for v in lrs]
    if len(lrs) != len(states):
        raise ConfigurationError(f"lrs: expected {len(states)} entries (one per checkpoint), got {len(lrs)}")
    if preconditioner is None or isinstance(preconditioner, Mapping):
        preconds = [preconditioner] * len(states)
    else:
        preconds = list(preconditioner)
        if len(preconds) != len(states):
            raise ConfigurationError(
                f"preconditioner: expected {len(states)} entries (one per checkpoint), got {len(preconds)}"
            )
    for c, (st, pc) in enumerate(zip(states, preconds)):
        miss = [n for n in trainable if n not in st]
        if miss:
            raise ConfigurationError(f"checkpoint {c} lacks trainable parameters {listing(miss)}")
        if pc is not None:
            miss = [n for n in trainable if n not in pc]
            bad = [n for n in trainable if n in pc and tuple(pc[n].shape) != tuple(named[n].shape)]
            if miss or bad:
                raise ConfigurationError(
                    f"preconditioner {c}: missing {listing(miss) or 'none'}; wrong shape "
                    f"{listing(bad) or 'none'}. It needs one tensor per trainable parameter, "
                    "shaped like the parameter."
                )
    return states, lrs, preconds


def _fingerprint(
    options: list,
    data: Sequence[torch.Tensor],
    groups: ParameterGroups,
    states: Sequence[Mapping[str, torch.Tensor]],
    preconds: Sequence[StateDict | None],
) -> str:
    """SHA-256 of the options (JSON), the data, and every checkpoint's trainable parameters and
    preconditioner (shape, dtype and raw bytes of each tensor)."""
    h = hashlib.sha256()

    def add(tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    h.update(json.dumps(options).encode())
    add(data)
    trainable = list(groups.param_names)
    for st, pc in zip(states, preconds):
        add([st[n] for n in trainable])
        add([] if pc is None else [pc[n] for n in trainable])
    return h.hexdigest()


__all__ = ["GroupComponents", "LossFn", "StateDict", "compute_group_components"]
