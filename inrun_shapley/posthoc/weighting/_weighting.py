"""Learned parameter-group weights for gradient-based attribution (post-hoc).

Not every layer matters equally for attribution. This module splits a model's trainable
parameters into named groups ``j`` and splits a gradient-similarity score into exact per-group
parts ``C_j(i, q)``, so that

    τ(i, q; w) = Σ_j w_j · C_j(i, q),        w = G · softmax(θ)     (uniform: w_j = 1)

is the unweighted score when ``w = 1``. The weights are fitted without labels (DESIGN.md §4):
for every query take the current top-k training samples and minimize

    L(θ) = −mean_q [ mean_{i ∈ topk_q} τ(i, q; w) / ‖τ(·, q; w)‖₂ ] + λ · penalty(w),

where the penalty pulls ``w`` toward uniform: ``"l2"`` is ``mean_j (w_j − 1)²`` and ``"kl"`` is
``KL(w/G ‖ uniform) = Σ_j (w_j/G) · log w_j``. The components are computed once (per-sample
gradients with ``torch.func``) and cached, so a fit takes seconds.

Conventions used throughout:

* **Shapes.** Component arrays are ``[G, n_train, n_query]``; every weighted score is
  ``[n_train, n_query]``, the same layout as per-query in-run values and as the ``scores``
  argument of :func:`inrun_shapley.metrics.linear_datamodeling_score`.
* **Sign.** Positive = training sample ``i``'s gradient is aligned with query ``q``'s gradient,
  i.e. a gradient step on ``i`` lowers ``q``'s loss (first order). To attribute an output that
  should *rise* (a margin), pass ``query_loss_fn`` returning minus that output.
* **Units.** ``C_j`` is ``Σ_c η_c · ⟨∇ℓ_q, P_c ⊙ ∇ℓ_i⟩`` restricted to group ``j``: loss²
  per parameter² times the checkpoint weights ``η_c`` (1 when none are given), i.e. the
  first-order change of the query loss per unit step on ``i``.

Learned weights are a proxy objective. Always compare the linear datamodeling score (LDS) with
uniform and learned weights before using learned ones (``benchmarks/weighting_digits.py``).

Example:
    >>> import torch
    >>> from inrun_shapley.posthoc.weighting import ParameterGroups
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> ParameterGroups.per_module(model).names
    ('0', '2')
    >>> ParameterGroups.per_tensor(model).names
    ('0.weight', '0.bias', '2.weight', '2.bias')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from inrun_shapley.errors import ConfigurationError, UnsupportedOptimizerError

PathLike = Union[str, os.PathLike]
StateDict = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_WEIGHTS_FORMAT = "inrun-shapley/group-weights"
_COMPONENTS_FORMAT = "inrun-shapley/group-components"
_ROOT = "(root)"


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class ParameterGroups:
    """An ordered partition of a model's trainable parameters into named groups.

    Every trainable parameter (``requires_grad=True``, in ``model.named_parameters()`` order)
    belongs to exactly one group; frozen parameters belong to none. Build one with
    :meth:`per_tensor`, :meth:`per_module`, :meth:`by_pattern` or :meth:`from_dict`; each
    gathers every problem (unassigned, duplicated, unknown, frozen parameters, empty groups)
    into one :class:`~inrun_shapley.errors.ConfigurationError`.

    Attributes:
        names: group names, in order (this order indexes the first axis of components and
            the weight vectors).
        members: ``{group name: tuple of parameter names}``, parameters in model order.
        param_names: all trainable parameter names, in model order.
    """

    def __init__(self, members: Mapping[str, Sequence[str]], param_names: Sequence[str]):
        """Validate a ``{group: [parameter names]}`` partition of ``param_names``.

        Prefer the classmethods, which compute ``param_names`` from a model.

        Args:
            members: group name → parameter names, in the desired group order.
            param_names: the trainable parameter names of the model, in model order.

        Raises:
            ConfigurationError: a parameter is unknown, assigned twice or unassigned, or a
                group is empty; the message lists all offenders.
        """
        param_names = list(param_names)
        known = set(param_names)
        owner: dict[str, list[str]] = {}
        problems: list[str] = []
        unknown: list[str] = []
        empty: list[str] = []
        for group, names in members.items():
            if isinstance(names, str):
                names = [names]
            if len(names) == 0:
                empty.append(group)
            for name in names:
                if name not in known:
                    unknown.append(name)
                owner.setdefault(name, []).append(group)
        duplicated = {n: g for n, g in owner.items() if len(g) > 1}
        unassigned = [n for n in param_names if n not in owner]
        if unknown:
            problems.append(f"not trainable parameters of the model: {_listing(unknown)}")
        if duplicated:
            dup = "; ".join(f"{n!r} in {g}" for n, g in list(duplicated.items())[:12])
            problems.append(f"assigned to more than one group: {dup}")
        if unassigned:
            problems.append(f"in no group: {_listing(unassigned)}")
        if empty:
            problems.append(f"empty groups: {_listing(empty)}")
        if problems:
            raise ConfigurationError(
                "Invalid parameter groups; every trainable parameter must belong to exactly one "
                "group. Problems: " + " | ".join(problems) + ". Fix the grouping (or add a "
                "default group) and try again."
            )
        order = {n: k for k, n in enumerate(param_names)}
        self.names: tuple[str, ...] = tuple(str(g) for g in members)
        self.members: dict[str, tuple[str, ...]] = {
            str(g): tuple(sorted(([ns] if isinstance(ns, str) else ns), key=order.__getitem__))
            for g, ns in members.items()
        }
        self.param_names: tuple[str, ...] = tuple(param_names)
        self._group_of = {n: g for g, ns in self.members.items() for n in ns}

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def per_tensor(cls, model: nn.Module) -> ParameterGroups:
        """One group per trainable parameter tensor, named by its qualified name."""
        names = _trainable_names(model)
        return cls({n: [n] for n in names}, names)

    @classmethod
    def per_module(cls, model: nn.Module, depth: int | None = None) -> ParameterGroups:
        """One group per module that owns trainable parameters.

        Args:
            model: the model.
            depth: if given, group by the first ``depth`` components of the owning module's
                qualified name instead (``depth=2`` puts ``blocks.0.attn.q.weight`` in group
                ``blocks.0``). Parameters owned by the root module go to group ``"(root)"``.
        """
        if depth is not None and depth < 1:
            raise ConfigurationError(f"per_module: depth must be >= 1 or None, got {depth}")
        names = _trainable_names(model)
        members: dict[str, list[str]] = {}
        for n in names:
            parts = n.split(".")[:-1]
            if depth is not None:
                parts = parts[:depth]
            members.setdefault(".".join(parts) or _ROOT, []).append(n)
        return cls(members, names)

    @classmethod
    def by_pattern(
        cls,
        model: nn.Module,
        patterns: Mapping[str, str] | Sequence[tuple[str, str]],
        default: str | None = None,
    ) -> ParameterGroups:
        """Groups from regular expressions on parameter names.

        Args:
            model: the model.
            patterns: ``{regex: group name}`` (or a sequence of pairs). A parameter joins the
                group of every pattern that ``re.search``-matches its name; matching patterns of
                two different groups is an error. Several patterns may name the same group.
                Groups are ordered by first appearance in ``patterns``.
            default: group for parameters no pattern matches (placed last; dropped when it
                would be empty). Without it an unmatched parameter is an error.

        Raises:
            ConfigurationError: invalid regex, parameters matched by several groups or by none,
                or a pattern group that matched nothing.
        """
        pairs = list(patterns.items()) if isinstance(patterns, Mapping) else list(patterns)
        compiled = []
        for regex, group in pairs:
            try:
                compiled.append((re.compile(regex), str(group)))
            except re.error as err:
                raise ConfigurationError(f"by_pattern: invalid regex {regex!r}: {err}") from err
        names = _trainable_names(model)
        members: dict[str, list[str]] = {g: [] for _, g in compiled}
        for n in names:
            hit = {g for rx, g in compiled if rx.search(n)}
            if not hit and default is not None:
                hit = {default}
            for g in sorted(hit):
                members.setdefault(g, []).append(n)
        if default is not None and default in members and not members[default]:
            if default not in {g for _, g in compiled}:
                del members[default]
        return cls(members, names)

    @classmethod
    def from_dict(cls, model: nn.Module, groups: Mapping[str, Sequence[str]]) -> ParameterGroups:
        """Groups given explicitly as ``{group name: [parameter names]}`` (in group order)."""
        names = _trainable_names(model)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        listed = [n for ns in groups.values() for n in ([ns] if isinstance(ns, str) else ns)]
        frozen_listed = [n for n in listed if n in frozen]
        if frozen_listed:
            raise ConfigurationError(
                f"from_dict: frozen parameters (requires_grad=False) cannot be grouped: "
                f"{_listing(frozen_listed)}; remove them from the mapping."
            )
        return cls(groups, names)

    @classmethod
    def resolve(
        cls, model: nn.Module, spec: ParameterGroups | str | Mapping[str, Sequence[str]]
    ) -> ParameterGroups:
        """Turn ``"tensor"``, ``"module"``, a ``{group: [names]}`` dict or groups into groups.

        A :class:`ParameterGroups` is checked against ``model``'s trainable parameters.
        """
        if isinstance(spec, ParameterGroups):
            names = _trainable_names(model)
            if tuple(names) != spec.param_names:
                missing = [n for n in names if n not in spec.param_names]
                extra = [n for n in spec.param_names if n not in names]
                raise ConfigurationError(
                    "ParameterGroups were built for another set of trainable parameters: "
                    f"missing {_listing(missing) or 'none'}; not in the model "
                    f"{_listing(extra) or 'none'}. Rebuild the groups from this model."
                )
            return spec
        if spec == "tensor":
            return cls.per_tensor(model)
        if spec == "module":
            return cls.per_module(model)
        if isinstance(spec, Mapping):
            return cls.from_dict(model, spec)
        raise ConfigurationError(
            f"groups must be 'tensor', 'module', a {{group: [param names]}} dict or "
            f"ParameterGroups, got {spec!r}"
        )

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __repr__(self) -> str:
        return f"ParameterGroups({len(self)} groups: {_listing(self.names, 8)})"

    def group_of(self, param_name: str) -> str:
        """Name of the group holding ``param_name``."""
        try:
            return self._group_of[param_name]
        except KeyError:
            raise ConfigurationError(f"{param_name!r} is not a grouped trainable parameter") from None

    def index_of(self, group: str) -> int:
        """Position of ``group`` in :attr:`names`."""
        try:
            return self.names.index(group)
        except ValueError:
            raise ConfigurationError(f"unknown group {group!r}; groups: {_listing(self.names)}") from None

    def to_dict(self) -> dict[str, list[str]]:
        """``{group: [parameter names]}`` in group order (JSON-serializable)."""
        return {g: list(ns) for g, ns in self.members.items()}


# --------------------------------------------------------------------------------------------
# Per-group score components
# --------------------------------------------------------------------------------------------


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
        if len(set(self.group_names)) != len(self.group_names):
            raise ConfigurationError(f"duplicate group names: {self.group_names}")

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

    def save(self, path: PathLike) -> None:
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
    def load(cls, path: PathLike) -> GroupComponents:
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


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module, eps: float | None = None
) -> dict[str, torch.Tensor]:
    """Adam/AdamW's diagonal preconditioner ``P = 1 / (sqrt(v_t / (1 − β2^t)) + ε)``.

    Reads torch's own state (``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad, ``step``).

    Args:
        optimizer: a ``torch.optim.Adam``/``AdamW`` (or compatible) optimizer after ≥ 1 step.
        model: the model whose trainable parameters it optimizes (for the names).
        eps: override the optimizer's ε.

    Returns:
        ``{parameter name: P}`` with ``P`` shaped like the parameter (units 1/gradient), ready
        for ``compute_group_components(preconditioner=...)``.

    Raises:
        UnsupportedOptimizerError: the state has no ``exp_avg_sq`` (not an Adam family optimizer).
        ConfigurationError: a trainable parameter has no optimizer state yet.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, torch.Tensor] = {}
    missing = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p, {})
        if not state:
            missing.append(name)
            continue
        if "exp_avg_sq" not in state:
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__} keeps no 'exp_avg_sq'; adam_preconditioner needs "
                "Adam/AdamW state. Pass your own {name: P} dict instead."
            )
        pg = group_of[id(p)]
        v = state["max_exp_avg_sq"] if pg.get("amsgrad", False) else state["exp_avg_sq"]
        step = float(state["step"])
        beta2 = pg["betas"][1]
        e = pg["eps"] if eps is None else eps
        out[name] = 1.0 / ((v.detach() / (1.0 - beta2**step)).sqrt() + e)
    if missing:
        raise ConfigurationError(
            f"no optimizer state for {_listing(missing)}; take at least one optimizer step "
            "with these parameters before building the preconditioner."
        )
    return out


def _load_state(ckpt: StateDict | PathLike) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, (str, os.PathLike)):
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        return obj
    return ckpt


def _hash_tensors(h, tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _as_list(x, n: int, what: str) -> list:
    if x is None or isinstance(x, Mapping):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ConfigurationError(f"{what}: expected {n} entries (one per checkpoint), got {len(x)}")
    return x


def compute_group_components(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    groups: ParameterGroups | str | Mapping[str, Sequence[str]] = "tensor",
    *,
    checkpoints: Sequence[StateDict | PathLike] | None = None,
    lrs: Sequence[float] | None = None,
    preconditioner: StateDict | Sequence[StateDict | None] | None = None,
    projection_dim: int | None = None,
    query_loss_fn: LossFn | None = None,
    batch_size: int = 256,
    seed: int = 0,
    cache_path: PathLike | None = None,
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
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for a batch of one sample.
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
        query_loss_fn: loss for the queries (default ``loss_fn``); return minus a quantity that
            should rise, e.g. ``-margin``, to attribute that quantity.
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
    query_loss_fn = query_loss_fn or loss_fn
    x_tr, y_tr = train
    x_q, y_q = query
    if len(x_tr) != len(y_tr) or len(x_q) != len(y_q):
        raise ConfigurationError(
            f"inputs and targets differ in length: train {len(x_tr)} vs {len(y_tr)}, "
            f"query {len(x_q)} vs {len(y_q)}"
        )
    if projection_dim is not None and projection_dim < 1:
        raise ConfigurationError(f"projection_dim must be >= 1 or None, got {projection_dim}")
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")

    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
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
    preconds = _as_list(preconditioner, len(states), "preconditioner")
    for c, (st, pc) in enumerate(zip(states, preconds)):
        miss = [n for n in trainable if n not in st]
        if miss:
            raise ConfigurationError(f"checkpoint {c} lacks trainable parameters {_listing(miss)}")
        if pc is not None:
            miss = [n for n in trainable if n not in pc]
            bad = [n for n in trainable if n in pc and tuple(pc[n].shape) != tuple(named[n].shape)]
            if miss or bad:
                raise ConfigurationError(
                    f"preconditioner {c}: missing {_listing(miss) or 'none'}; wrong shape "
                    f"{_listing(bad) or 'none'}. It needs one tensor per trainable parameter, "
                    "shaped like the parameter."
                )

    method = "grad_dot" + ("+precond" if any(p is not None for p in preconds) else "")
    method += f"+proj{projection_dim}" if projection_dim is not None else ""
    h = hashlib.sha256()
    h.update(json.dumps([method, groups.to_dict(), lrs, seed, batch_size]).encode())
    _hash_tensors(h, [x_tr, y_tr, x_q, y_q])
    for st, pc in zip(states, preconds):
        _hash_tensors(h, [st[n] for n in trainable])
        _hash_tensors(h, [] if pc is None else [pc[n] for n in trainable])
    fingerprint = h.hexdigest()

    if cache_path is not None and Path(cache_path).exists():
        cached = GroupComponents.load(cache_path)
        if cached.fingerprint != fingerprint:
            raise ConfigurationError(
                f"cache {cache_path} was computed from other inputs (model, data, checkpoints, "
                "groups or options differ); delete it or choose another cache_path."
            )
        return cached

    values = _grad_dot_components(
        model, loss_fn, query_loss_fn, (x_tr, y_tr), (x_q, y_q), groups, states, lrs, preconds,
        buffers, projection_dim, batch_size, seed,
    )
    result = GroupComponents(values, groups.names, method, fingerprint)
    if cache_path is not None:
        result.save(cache_path)
    return result


def _grad_dot_components(
    model, loss_fn, query_loss_fn, train, query, groups, states, lrs, preconds, buffers,
    projection_dim, batch_size, seed,
) -> np.ndarray:
    trainable = list(groups.param_names)
    frozen_names = [n for n, p in model.named_parameters() if n not in groups._group_of]
    x_tr, y_tr = train
    x_q, y_q = query
    n_tr, n_q, G = len(x_tr), len(x_q), len(groups)
    out = torch.zeros(G, n_tr, n_q, dtype=torch.float64)

    def make_grad_fn(fn):
        def single(params, rest, x, y):
            outputs = functional_call(model, {**rest, **params}, (x.unsqueeze(0),))
            return fn(outputs, y.unsqueeze(0))

        return vmap(grad(single), in_dims=(None, None, 0, 0))

    grad_train, grad_query = make_grad_fn(loss_fn), make_grad_fn(query_loss_fn)

    # Per-group projections, drawn once in group order so they are the same for every checkpoint.
    projections: list[torch.Tensor | None] = []
    gen = torch.Generator().manual_seed(seed)
    for g in groups.names:
        d = sum(states[0][n].numel() for n in groups.members[g])
        if projection_dim is None or projection_dim >= d:
            projections.append(None)
        else:
            r = torch.randn(d, projection_dim, generator=gen, dtype=torch.float64)
            projections.append(r / projection_dim**0.5)

    def flat_groups(per_param: Mapping[str, torch.Tensor], batch: int) -> list[torch.Tensor]:
        return [
            torch.cat([per_param[n].reshape(batch, -1) for n in groups.members[g]], dim=1).double()
            for g in groups.names
        ]

    def project(j: int, m: torch.Tensor) -> torch.Tensor:
        return m if projections[j] is None else m @ projections[j]

    was_training = {name: mod.training for name, mod in model.named_modules()}
    model.eval()
    try:
        for st, lr, pc in zip(states, lrs, preconds):
            dtype_of = {n: p.dtype for n, p in model.named_parameters()}
            params = {n: st[n].detach().to(dtype_of[n]) for n in trainable}
            rest = {n: st[n].detach() if n in st else b for n, b in buffers.items()}
            rest.update({n: (st[n] if n in st else dict(model.named_parameters())[n]).detach()
                         for n in frozen_names})
            pc_flat = None
            if pc is not None:
                pc_flat = flat_groups({n: pc[n].detach().unsqueeze(0) for n in trainable}, 1)
            gq = [
                project(j, m)
                for j, m in enumerate(flat_groups(_batched(grad_query, params, rest, x_q, y_q, batch_size), n_q))
            ]
            for start in range(0, n_tr, batch_size):
                stop = min(start + batch_size, n_tr)
                g = grad_train(params, rest, x_tr[start:stop], y_tr[start:stop])
                for j, m in enumerate(flat_groups(g, stop - start)):
                    if pc_flat is not None:
                        m = m * pc_flat[j]
                    out[j, start:stop] += lr * (project(j, m) @ gq[j].T)
    finally:
        for name, mod in model.named_modules():
            mod.training = was_training[name]
    return out.numpy()


def _batched(fn, params, rest, x, y, batch_size) -> dict[str, torch.Tensor]:
    parts = [fn(params, rest, x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@dataclass
class GroupWeights:
    """Non-negative weights per parameter group, ``w = G · softmax(θ)`` (uniform = 1 each).

    Attributes:
        group_names: the ``G`` group names, in weight order.
        weights: ``[G]`` non-negative, summing to ``G``.
        aspect: optional name of what the weights were fitted for.
        objective_trace: objective value at every evaluation of the fit (empty if not fitted).
        config: the fitting options (JSON-serializable).
        fit_info: fit diagnostics (uniform objective, per-restart objectives, winner).
    """

    group_names: tuple[str, ...]
    weights: np.ndarray
    aspect: str | None = None
    objective_trace: np.ndarray = field(default_factory=lambda: np.zeros(0))
    config: dict = field(default_factory=dict)
    fit_info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.group_names = tuple(str(g) for g in self.group_names)
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        self.objective_trace = np.asarray(self.objective_trace, dtype=np.float64).reshape(-1)
        if self.weights.shape[0] != len(self.group_names):
            raise ConfigurationError(
                f"{self.weights.shape[0]} weights for {len(self.group_names)} group names"
            )
        if len(set(self.group_names)) != len(self.group_names):
            raise ConfigurationError(f"duplicate group names: {self.group_names}")
        if np.any(~np.isfinite(self.weights)) or np.any(self.weights < 0):
            raise ConfigurationError(f"weights must be finite and non-negative, got {self.weights}")

    @classmethod
    def uniform(cls, group_names: Sequence[str] | ParameterGroups) -> GroupWeights:
        """All weights 1 (reproduces the unweighted score)."""
        names = group_names.names if isinstance(group_names, ParameterGroups) else tuple(group_names)
        return cls(names, np.ones(len(names)))

    def as_dict(self) -> dict[str, float]:
        """``{group: weight}``."""
        return {g: float(w) for g, w in zip(self.group_names, self.weights)}

    def aligned(self, group_names: Sequence[str] | ParameterGroups) -> np.ndarray:
        """The weights in the order of ``group_names`` (same set of names required).

        Raises:
            ConfigurationError: the names differ; lists the missing and unexpected ones.
        """
        names = list(group_names.names if isinstance(group_names, ParameterGroups) else group_names)
        _check_same_names(names, self.group_names, "the target", "the weights")
        lookup = self.as_dict()
        return np.array([lookup[n] for n in names], dtype=np.float64)

    def table(self) -> str:
        """Plain-text table: group, weight, share (= weight / G, the softmax probability)."""
        G = len(self.group_names)
        width = max([5] + [len(g) for g in self.group_names])
        head = f"{'group':<{width}}  {'weight':>8}  {'share':>7}"
        lines = [f"aspect: {self.aspect}"] if self.aspect else []
        lines += [head, "-" * len(head)]
        for g, w in zip(self.group_names, self.weights):
            lines.append(f"{g:<{width}}  {w:8.4f}  {100 * w / G:6.2f}%")
        return "\n".join(lines)

    def to_json(self) -> str:
        """JSON text with the group names, weights, fit trace and options."""
        return json.dumps(
            {
                "format": _WEIGHTS_FORMAT,
                "version": 1,
                "aspect": self.aspect,
                "group_names": list(self.group_names),
                "weights": self.weights.tolist(),
                "objective_trace": self.objective_trace.tolist(),
                "config": self.config,
                "fit_info": self.fit_info,
            },
            indent=2,
        )

    def save(self, path: PathLike) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(
        cls, path: PathLike, groups: Sequence[str] | ParameterGroups | None = None
    ) -> GroupWeights:
        """Read weights written by :meth:`save`.

        Args:
            path: the JSON file.
            groups: if given, the groups the weights will be applied to; the result is
                reordered to match them.

        Raises:
            ConfigurationError: not a weights file, or its group names differ from ``groups``
                (the message lists the missing and unexpected names).
        """
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != _WEIGHTS_FORMAT:
            raise ConfigurationError(f"{path} is not a group-weights file written by GroupWeights.save")
        w = cls(
            tuple(data["group_names"]), np.array(data["weights"]), data.get("aspect"),
            np.array(data.get("objective_trace", [])), data.get("config", {}),
            data.get("fit_info", {}),
        )
        if groups is not None:
            names = groups.names if isinstance(groups, ParameterGroups) else tuple(groups)
            w = GroupWeights(names, w.aligned(names), w.aspect, w.objective_trace, w.config, w.fit_info)
        return w


def _check_same_names(target: Sequence[str], source: Sequence[str], tname: str, sname: str) -> None:
    dups = sorted({n for n in target if list(target).count(n) > 1})
    if dups:
        raise ConfigurationError(f"{tname} lists duplicate group names: {_listing(dups)}")
    missing = [n for n in target if n not in set(source)]
    extra = [n for n in source if n not in set(target)]
    if missing or extra:
        raise ConfigurationError(
            f"group names do not match: in {tname} but not in {sname}: "
            f"{_listing(missing) or 'none'}; in {sname} but not in {tname}: "
            f"{_listing(extra) or 'none'}. Fit or load weights for the same parameter groups."
        )


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit_weights`.

    Attributes:
        top_k: training samples per query in the objective's numerator (the current top-k by
            the weighted score, re-selected at every evaluation).
        penalty: λ, strength of the pull toward uniform weights.
        penalty_kind: ``"l2"``: ``mean_j (w_j − 1)²``; ``"kl"``: ``KL(w/G ‖ uniform)``.
        steps: optimizer iterations (Adam steps, or LBFGS max iterations).
        lr: optimizer step size on θ.
        optimizer: ``"adam"`` or ``"lbfgs"``.
        max_queries: fit on at most this many queries (drawn with ``seed``); None = all.
        seed: seeds the query subsample and the restarts' initial θ.
        restarts: optimizer runs; run 0 starts uniform, the others from random θ.
        init_noise: standard deviation of the random initial θ of runs 1, 2, ...
    """

    top_k: int = 10
    penalty: float = 0.05
    penalty_kind: str = "l2"
    steps: int = 200
    lr: float = 0.05
    optimizer: str = "adam"
    max_queries: int | None = None
    seed: int = 0
    restarts: int = 8
    init_noise: float = 2.0

    def __post_init__(self):
        problems = []
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1 (got {self.top_k})")
        if self.penalty < 0:
            problems.append(f"penalty must be >= 0 (got {self.penalty})")
        if self.penalty_kind not in ("l2", "kl"):
            problems.append(f"penalty_kind must be 'l2' or 'kl' (got {self.penalty_kind!r})")
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.optimizer not in ("adam", "lbfgs"):
            problems.append(f"optimizer must be 'adam' or 'lbfgs' (got {self.optimizer!r})")
        if self.max_queries is not None and self.max_queries < 1:
            problems.append(f"max_queries must be >= 1 or None (got {self.max_queries})")
        if self.restarts < 1:
            problems.append(f"restarts must be >= 1 (got {self.restarts})")
        if self.init_noise < 0:
            problems.append(f"init_noise must be >= 0 (got {self.init_noise})")
        if problems:
            raise ConfigurationError("Invalid FitConfig: " + "; ".join(problems))


def group_weight_objective(
    theta: torch.Tensor,
    components: torch.Tensor,
    top_k: int,
    penalty: float = 0.0,
    penalty_kind: str = "l2",
) -> torch.Tensor:
    """The label-free objective (pure function, differentiable in ``theta``).

    Args:
        theta: ``[G]`` logits; ``w = G · softmax(theta)``.
        components: ``[G, n_train, n_query]``.
        top_k: training samples per query in the numerator (clipped to ``n_train``).
        penalty: λ.
        penalty_kind: ``"l2"`` (``mean_j (w_j − 1)²``) or ``"kl"`` (``Σ_j (w_j/G) log w_j``).

    Returns:
        Scalar ``−mean_q[mean_{i∈topk_q} τ(i,q;w) / ‖τ(·,q;w)‖₂] + λ·penalty(w)``; lower is
        better. The top-k set is chosen on the detached scores (no gradient through selection).
    """
    G = components.shape[0]
    p = torch.softmax(theta, dim=0)
    w = G * p
    tau = torch.einsum("j,jnq->nq", w, components)
    norms = tau.norm(dim=0).clamp_min(torch.finfo(tau.dtype).tiny)
    k = min(top_k, tau.shape[0])
    idx = tau.detach().topk(k, dim=0).indices
    concentration = tau.gather(0, idx).mean(dim=0) / norms
    value = -concentration.mean()
    if penalty:
        if penalty_kind == "l2":
            value = value + penalty * ((w - 1.0) ** 2).mean()
        else:
            value = value + penalty * (p * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))).sum()
    return value


def _fit_from(C: torch.Tensor, theta0: torch.Tensor, config: FitConfig):
    """One optimizer run from ``theta0``; returns (best objective, best θ, trace)."""
    theta = theta0.clone().requires_grad_(True)
    trace: list[float] = []
    best = [float("inf"), theta0.clone()]

    def evaluate() -> torch.Tensor:
        val = group_weight_objective(theta, C, config.top_k, config.penalty, config.penalty_kind)
        v = float(val.detach())
        trace.append(v)
        if v < best[0]:
            best[0], best[1] = v, theta.detach().clone()
        return val

    if config.optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=config.lr)
        for _ in range(config.steps):
            opt.zero_grad()
            evaluate().backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS([theta], lr=config.lr, max_iter=config.steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            val = evaluate()
            val.backward()
            return val

        opt.step(closure)
    with torch.no_grad():
        evaluate()
    return best[0], best[1], trace


def fit_weights(
    components: GroupComponents,
    config: FitConfig | None = None,
    aspect: str | None = None,
) -> GroupWeights:
    """Fit group weights on one set of query components with the label-free objective.

    The objective has several local minima (typically one near uniform and others where a
    group is switched off), so the fit runs ``config.restarts`` times: once from uniform
    (θ = 0) and from seeded Gaussian θ with std ``config.init_noise``; each run keeps the lowest
    objective it saw, and the run with the lowest objective wins (ties go to the uniform start).
    The choice looks at the objective only, never at held-out labels. Deterministic for a given
    ``config.seed``.

    Args:
        components: ``[G, n_train, n_query]`` components; the queries are the fitting set.
        config: fitting options (default :class:`FitConfig`).
        aspect: a name stored with the weights.

    Returns:
        :class:`GroupWeights` in ``components.group_names`` order. ``objective_trace`` is the
        winning run's trace (``trace[0]`` = its start); ``fit_info`` holds
        ``uniform_objective`` (objective at w = 1), ``restart_objectives`` (best of each run,
        run 0 = uniform start) and ``winner``. ``min(trace) <= uniform_objective`` always.
    """
    config = config or FitConfig()
    values = components.values
    gen = torch.Generator().manual_seed(config.seed)
    if config.max_queries is not None and components.n_query > config.max_queries:
        pick = torch.randperm(components.n_query, generator=gen)[: config.max_queries]
        values = values[:, :, np.sort(pick.numpy())]
    C = torch.as_tensor(values, dtype=torch.float64)
    scale = float(np.abs(values).max()) or 1.0
    C = C / scale  # the objective is scale-invariant in C; this keeps the numbers near 1
    G = C.shape[0]
    starts = [torch.zeros(G, dtype=torch.float64)]
    starts += [
        config.init_noise * torch.randn(G, generator=gen, dtype=torch.float64)
        for _ in range(config.restarts - 1)
    ]
    runs = [_fit_from(C, t0, config) for t0 in starts]
    winner = min(range(len(runs)), key=lambda r: (runs[r][0], r))
    _, theta, trace = runs[winner]
    weights = (G * torch.softmax(theta, dim=0)).numpy()
    info = {
        "uniform_objective": runs[0][2][0],
        "restart_objectives": [r[0] for r in runs],
        "winner": winner,
        "scale": scale,
    }
    return GroupWeights(components.group_names, weights, aspect, np.array(trace), asdict(config), info)


def fit_group_weights(
    aspects: Mapping[str, GroupComponents], config: FitConfig | None = None
) -> dict[str, GroupWeights]:
    """One weight vector per aspect: ``{aspect name: components of its query set}``.

    Each aspect's queries should isolate that aspect (e.g. queries of one class, one task).

    Returns:
        ``{aspect name: GroupWeights}`` fitted independently with the same ``config``.
    """
    if not aspects:
        raise ConfigurationError("fit_group_weights needs at least one aspect")
    names = {a: c.group_names for a, c in aspects.items()}
    first = next(iter(names.values()))
    bad = [a for a, n in names.items() if n != first]
    if bad:
        raise ConfigurationError(
            f"aspects {bad} have other group names than {next(iter(names))!r}; compute all "
            "aspects' components with the same ParameterGroups"
        )
    return {a: fit_weights(c, config, aspect=a) for a, c in aspects.items()}


# --------------------------------------------------------------------------------------------
# Applying weights
# --------------------------------------------------------------------------------------------


def reweigh(
    components: GroupComponents | np.ndarray,
    weights: GroupWeights | np.ndarray | Sequence[float],
) -> np.ndarray:
    """Weighted score ``τ(i, q; w) = Σ_j w_j C_j(i, q)``.

    Args:
        components: :class:`GroupComponents` or a raw ``[G, n_train, n_query]`` array.
        weights: :class:`GroupWeights` (aligned by group name when ``components`` has names)
            or a raw ``[G]`` vector in component order.

    Returns:
        ``[n_train, n_query]`` float64 scores (positive = a step on ``i`` lowers ``q``'s loss),
        directly usable as LDS ``scores``.
    """
    if isinstance(components, GroupComponents):
        values, names = components.values, components.group_names
    else:
        values, names = np.asarray(components, dtype=np.float64), None
        if values.ndim != 3:
            raise ConfigurationError(f"components must be [G, n_train, n_query], got {values.shape}")
    if isinstance(weights, GroupWeights):
        w = weights.aligned(names) if names is not None else weights.weights
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != values.shape[0]:
        raise ConfigurationError(f"{w.shape[0]} weights for {values.shape[0]} component groups")
    return np.tensordot(w, values, axes=(0, 0))


def reweigh_group_values(
    group_values,
    group_names: Sequence[str],
    weights: GroupWeights | Mapping[str, float],
) -> np.ndarray:
    """Re-weigh in-run values logged per parameter group.

    Args:
        group_values: ``[n_ids, G]`` per-sample values split by group (e.g. a value log's
            ``group_values``); units and sign as logged (positive = helpful).
        group_names: the ``G`` column names (e.g. the log's ``group_names``).
        weights: :class:`GroupWeights` or ``{group: weight}``; aligned to the columns by name.

    Returns:
        ``[n_ids]`` float64: ``Σ_j w_j · group_values[:, j]``.

    Raises:
        ConfigurationError: shape mismatch, duplicate names, or the weights' group names differ
            from ``group_names`` (both directions listed).
    """
    values = np.asarray(group_values, dtype=np.float64)
    names = [str(n) for n in group_names]
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ConfigurationError(
            f"group_values must be [n_ids, {len(names)}] (one column per group name), got "
            f"shape {values.shape}"
        )
    if isinstance(weights, GroupWeights):
        w = weights.aligned(names)
    else:
        weights = {str(k): float(v) for k, v in weights.items()}
        _check_same_names(names, list(weights), "the logged values", "the weights")
        w = np.array([weights[n] for n in names], dtype=np.float64)
    return values @ w


def plot_group_weights(
    weights: GroupWeights | Mapping[str, GroupWeights], path: PathLike, title: str | None = None
) -> Path:
    """Bar plot of group weights (one bar series per aspect) written as a PNG.

    Uses matplotlib's Agg canvas directly (no global backend change). A dashed line marks the
    uniform weight 1.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {weights.aspect or "weights": weights} if isinstance(weights, GroupWeights) else dict(weights)
    if not series:
        raise ConfigurationError("plot_group_weights: nothing to plot")
    names = list(next(iter(series.values())).group_names)
    G = len(names)
    fig = Figure(figsize=(max(4.0, 0.5 * G + 2.0), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    xs = np.arange(G)
    for k, (label, gw) in enumerate(series.items()):
        ax.bar(xs + (k - (len(series) - 1) / 2) * width, gw.aligned(names), width, label=label)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("weight (uniform = 1)")
    ax.set_title(title or "learned parameter-group weights")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


__all__ = [
    "ParameterGroups",
    "GroupComponents",
    "GroupWeights",
    "FitConfig",
    "adam_preconditioner",
    "compute_group_components",
    "group_weight_objective",
    "fit_weights",
    "fit_group_weights",
    "reweigh",
    "reweigh_group_values",
    "plot_group_weights",
]
