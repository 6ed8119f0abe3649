"""Per-query values: which layers take the ghost path, and the ghost path's query side.

The exact per-query path forms every query's gradient ``g_q`` (``Q`` copies of the tracked
parameters) and maps each training sample's captures through each of them. Linear and Embedding
layers have ghost forms (:mod:`inrun_shapley.capture.ghost`) that need neither gradient: this
module plans, per layer, which path is taken (:func:`plan_query_path`, with a FLOP estimate) and
holds the query side of the ghost path (:class:`GhostQueries`).

The query side (``a_q``, ``b_q`` of every query sample) is captured during the per-query
validation pass. Queries do not interact, so ONE backward of the SUM of the query losses gives
every query row its own ``b_q`` (per-token queries: one backward per token position, batched).

Layers without a ghost form (norms, attention through the JVP rule, convolutions, custom
modules) and parameters shared between modules stay on the exact path; the two parts add up.
The leave-one-out estimator's Jacobian can change sign, so it has no rank-1 factorization:
``query_path="ghost"`` refuses it and ``"auto"`` keeps it exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from inrun_shapley.capture.ghost import GHOST_KINDS, ghost_dot, ghost_kind, prepare_query_side
from inrun_shapley.capture.registry import Capture, up
from inrun_shapley.engine.batched import batched_or_loop
from inrun_shapley.engine.directions import Estimator, ghost_factors
from inrun_shapley.engine.validation import eval_mode
from inrun_shapley.errors import ConfigurationError, SampleIdError

__all__ = ["GHOST_KINDS", "QUERY_PATHS", "GhostQueries", "PlanRow", "estimated_flops", "plan_query_path"]

QUERY_PATHS = ("auto", "exact", "ghost")


# --------------------------------------------------------------------- cost model
def estimated_flops(kind: str, *, train_positions: int, queries: int, query_rows: int, query_positions: int,
                    d_in: int, d_out: int) -> tuple[float, float]:
    """Estimated FLOPs of one step's per-query scoring of one layer, ``(exact, ghost)``.

    Args:
        kind: ``"linear"`` or ``"embedding"`` (for an Embedding ``d_in`` is the vocabulary size
            and ``d_out`` the embedding size).
        train_positions: training rows × positions per row in the step (``B·T``).
        queries: ``Q`` (query rows × tokens per row for per-token queries).
        query_rows: ``m`` query rows.
        query_positions: ``S`` positions per query row.
        d_in, d_out: the layer's sizes.

    Exact: forming the query gradients (``Q·S·d_in·d_out`` multiply-adds, dense ``Q·V·d`` for an
    Embedding), the direction ``P ⊙ g`` and one layer forward per query per training position.
    Ghost: the two Gram matrices over (training position, query position) pairs; the activation
    Gram is shared by the tokens of one query row.
    """
    bt, q, m, s = train_positions, queries, query_rows, query_positions
    if kind == "linear":
        exact = 2.0 * q * s * d_in * d_out + 3.0 * q * d_in * d_out + 2.0 * bt * q * d_in * d_out
        ghost = 2.0 * bt * m * s * d_in + 2.0 * bt * q * s * d_out + 2.0 * bt * q * s
    elif kind == "embedding":
        exact = 2.0 * q * s * d_out + 3.0 * q * d_in * d_out + 2.0 * bt * q * d_out
        ghost = 1.0 * bt * m * s + 2.0 * bt * q * s * d_out + 2.0 * bt * q * s
    else:
        raise ValueError(f"no ghost form for layer kind {kind!r}")
    return exact, ghost


@dataclass
class PlanRow:
    """One row of the query-path plan: which path a layer takes, and why."""

    module: str
    kind: str
    path: str  # "ghost" or "exact"
    exact_flops: float | None = None
    ghost_flops: float | None = None
    reason: str = ""


# --------------------------------------------------------------------- query captures
def _rows_first(x: Tensor, rows: int, what: str) -> Tensor:
    if x.dim() == 0 or x.shape[0] % rows != 0:
        raise SampleIdError(
            f"{what}: a ghost-path layer was called on an input with first dimension "
            f"{x.shape[0] if x.dim() else None} for a query batch of {rows} rows; the sample "
            "dimension must come first (use query_path='exact' otherwise)"
        )
    return x


class GhostQueries:
    """Query-side captures of the ghost layers and the per-step ghost scoring.

    Created by the tracker for one optimizer step: :meth:`recording` and :meth:`collect` run
    inside :meth:`~inrun_shapley.engine.validation.ValidationObjective.query_gradients` (one query
    chunk at a time), :meth:`prepare` folds the step's scalars and preconditioners into the
    query side, and :meth:`dot` scores one training capture against every query.

    Args:
        modules: ``{qualified name: module}`` of the layers scored by ghost products (their
            rule kind in :data:`GHOST_KINDS`).
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self.kinds = {n: ghost_kind(m) for n, m in self.modules.items()}
        self.param_ids = {id(p) for m in self.modules.values() for p in m.parameters(recurse=False)}
        self._calls: dict[str, list[tuple[Tensor, Tensor]]] = {}
        # per chunk: {name: (a_or_idx [m, S, d_in] / [m, S], b [m, K, S, d_out])}
        self.chunks: list[dict[str, tuple[Tensor, Tensor]]] = []
        self.chunk_rows: list[int] = []
        self.tokens = 1  # K: queries per row
        self._prepared: list[dict[str, dict]] = []

    @property
    def n_queries(self) -> int:
        return sum(self.chunk_rows) * self.tokens

    # ---- validation pass
    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record (input, output) of every call of the ghost layers during one query forward."""
        self._calls = {name: [] for name in self.modules}
        handles = [m.register_forward_hook(partial(self._record, name)) for name, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _record(self, name: str, module, args, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            self._calls[name].append((args[0].detach(), output))

    def observe(self, forward: Callable[[], Tensor]) -> Tensor:
        """Run one chunk's query forward (``forward()`` returns its losses, ``[m]`` or ``[m, T]``),
        recording the ghost layers' calls in it and then each query's output gradients
        (:meth:`recording`, :meth:`collect`); returns the losses."""
        with self.recording():
            losses = forward()
        self.collect(losses)
        return losses

    def collect(self, losses: Tensor) -> None:
        """Each query's own output gradients ``b_q`` from the chunk's losses (``[m]`` or ``[m, T]``).

        Per-row losses: one backward of their sum. Per-token losses ``[m, K]``: K backwards (batched),
        the k-th of ``sum_rows loss[:, k]``, giving each (row, token) query its own ``b``.
        """
        rows = losses.shape[0]
        flat = up(losses).reshape(rows, -1)
        k = flat.shape[1]
        if self.chunks and k != self.tokens:
            raise ConfigurationError("every query chunk must have the same number of tokens per row")
        self.tokens = k
        names = [n for n in self.modules if self._calls.get(n)]
        outs = [o for n in names for _, o in self._calls[n]]
        chunk: dict[str, tuple[Tensor, Tensor]] = {}
        if outs:
            if k == 1:
                grads = torch.autograd.grad(flat.sum(), outs, allow_unused=True, retain_graph=True)
                grads = [None if g is None else g.unsqueeze(0) for g in grads]  # [1, *out]
            else:
                eye = torch.eye(k, dtype=flat.dtype, device=flat.device).unsqueeze(1).expand(k, rows, k)

                def batched():
                    return torch.autograd.grad(flat, outs, grad_outputs=eye.reshape(k, *losses.shape),
                                               is_grads_batched=True, allow_unused=True, retain_graph=True)

                def loop():  # one backward per token position
                    per = [torch.autograd.grad(flat[:, j].sum(), outs, allow_unused=True, retain_graph=True)
                           for j in range(k)]
                    return [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(outs))]

                grads = batched_or_loop(batched, loop, "per-token query gradients of the ghost layers")
            it = iter(grads)
            for name in names:
                a_parts, b_parts = [], []
                for a, out in self._calls[name]:
                    g = next(it)
                    if g is None:
                        g = torch.zeros(k, *out.shape, dtype=up(out.detach()).dtype, device=out.device)
                    _rows_first(a, rows, name)
                    if self.kinds[name] == "embedding":
                        a_parts.append(a.reshape(rows, -1))
                        b_parts.append(up(g.detach()).reshape(k, rows, -1, g.shape[-1]))
                    else:
                        a_parts.append(up(a).reshape(rows, -1, a.shape[-1]))
                        b_parts.append(up(g.detach()).reshape(k, rows, -1, g.shape[-1]))
                a_all = torch.cat(a_parts, dim=1)  # several calls: their positions add up
                b_all = torch.cat(b_parts, dim=2).permute(1, 0, 2, 3).contiguous()  # [m, K, S, d_out]
                chunk[name] = (a_all, b_all)
        self._calls = {}
        self.chunks.append(chunk)
        self.chunk_rows.append(rows)

    # ---- per step
    def prepare(self, terms: Mapping[int, object], estimator: "Estimator | str") -> None:
        """Fold ``sign·lr·k`` and the preconditioner of every ghost parameter into the query side.

        Args:
            terms: ``{id(param): StepTerms or None}`` for this step.
            estimator: ``shapley`` (``P`` and ``k`` used) or ``sgd`` (``lr`` and sign only).

        Raises:
            ConfigurationError: an estimator without a ghost form (``loo``).
        """
        estimator = Estimator.parse(estimator)
        if not estimator.has_ghost_form:
            raise ConfigurationError(f"the ghost path supports estimators 'shapley' and 'sgd', not {estimator.value!r}")
        self._prepared = []
        for chunk in self.chunks:
            prepared: dict[str, dict] = {}
            for name, (a_q, b_q) in chunk.items():
                entry: dict = {}
                for pname, p in self.modules[name].named_parameters(recurse=False):
                    t = terms.get(id(p))
                    if t is None or not p.requires_grad:
                        continue
                    scale, precond = ghost_factors(estimator, t)
                    entry[pname] = prepare_query_side(self.kinds[name], pname, scale, precond, a_q, b_q)
                if entry:
                    prepared[name] = entry
            self._prepared.append(prepared)

    def dot(self, name: str, capture: Capture, n: int) -> Tensor:
        """``[n, Q]`` values of the ``n`` training samples of one captured call of layer ``name``."""
        parts = []
        for chunk_rows, prepared in zip(self.chunk_rows, self._prepared):
            entry = prepared.get(name)
            if entry is None:
                parts.append(None)
                continue
            parts.append(ghost_dot(self.modules[name], capture, n, entry))
        ref = next((p for p in parts if p is not None), None)
        if ref is None:
            return torch.zeros(n, self.n_queries, dtype=up(capture.grad_output).dtype, device=capture.grad_output.device)
        return torch.cat([
            p if p is not None else torch.zeros(n, rows * self.tokens, dtype=ref.dtype, device=ref.device)
            for p, rows in zip(parts, self.chunk_rows)
        ], dim=1)


# --------------------------------------------------------------------- planning
def plan_query_path(path: str, modules: Mapping[str, tuple], *, estimator: "Estimator | str", validation, model: nn.Module,
                    preconditioned: bool = False, train_positions: Mapping[str, int] | None = None) -> list[PlanRow]:
    """Decide which tracked layers take the ghost path.

    ``"auto"`` never trades exactness for speed: it takes the ghost path only for layers where
    the ghost product is exact (Embedding always; Linear when there is no preconditioner: SGD, or
    the ``sgd`` estimator) and estimated cheaper by :func:`estimated_flops`. The rank-1
    approximation of Adam's ``P`` on Linear weights is used only when asked for (``"ghost"``).

    Args:
        path: ``"auto"``, ``"exact"`` or ``"ghost"``.
        modules: the tracker's ``{name: (module, rule, params)}``.
        estimator: the tracker's estimator (``"loo"`` has no ghost form).
        preconditioned: the step has an elementwise preconditioner (Adam with ``"shapley"``).
        validation: the per-query :class:`~inrun_shapley.engine.validation.ValidationObjective`.
        model: the model (one no-grad forward of the first query chunk measures the shapes).
        train_positions: ``{name: B·T}`` of the training step if known (else assumed equal to the
            query chunk's rows × positions).

    Returns:
        one :class:`PlanRow` per tracked layer.
    """
    owners: dict[int, int] = {}
    for _, (_, _, params) in modules.items():
        for p in params.values():
            owners[id(p)] = owners.get(id(p), 0) + 1
    rows_out: list[PlanRow] = []
    eligible = {}
    for name, (module, rule, params) in modules.items():
        if rule.kind not in GHOST_KINDS:
            rows_out.append(PlanRow(name, rule.kind, "exact", reason="no ghost form"))
        elif any(owners[id(p)] > 1 for p in params.values()):
            rows_out.append(PlanRow(name, rule.kind, "exact", reason="parameter shared with another layer"))
        elif not Estimator.parse(estimator).has_ghost_form:
            rows_out.append(PlanRow(name, rule.kind, "exact", reason="loo Jacobian has no rank-1 form"))
        elif path == "exact":
            rows_out.append(PlanRow(name, rule.kind, "exact", reason="query_path='exact'"))
        elif path == "auto" and preconditioned and rule.kind == "linear":
            rows_out.append(PlanRow(name, rule.kind, "exact",
                                    reason="auto: ghost would approximate Adam's P (query_path='ghost' accepts it)"))
        else:
            eligible[name] = module
            rows_out.append(PlanRow(name, rule.kind, "ghost", reason=f"query_path={path!r}"))
    if path != "auto" or not eligible:
        return rows_out
    shapes = _probe_shapes(eligible, validation, model)
    q_total = len(validation) * shapes["tokens"]
    for row in rows_out:
        if row.module not in eligible:
            continue
        module = eligible[row.module]
        m, s = shapes["rows"], shapes["positions"].get(row.module, 1)
        bt = (train_positions or {}).get(row.module) or m * s
        if isinstance(module, nn.Embedding):
            d_in, d_out = module.num_embeddings, module.embedding_dim
        else:
            d_in, d_out = module.in_features, module.out_features
        exact, ghost = estimated_flops(row.kind, train_positions=bt, queries=q_total, query_rows=len(validation),
                                       query_positions=s, d_in=d_in, d_out=d_out)
        row.exact_flops, row.ghost_flops = exact, ghost
        row.path = "ghost" if ghost < exact else "exact"
        row.reason = "auto: estimated FLOPs"
    return rows_out


def _probe_shapes(modules: Mapping[str, nn.Module], validation, model: nn.Module) -> dict:
    """Positions per query row of each layer (all calls), query rows and tokens per row."""
    batch, rows = next(validation.chunks(0))
    seen: dict[str, int] = {name: 0 for name in modules}

    def hook(name, module, args, output):
        x = args[0]
        per = x.numel() // max(1, rows) if isinstance(module, nn.Embedding) else x.numel() // max(1, rows * x.shape[-1])
        seen[name] += per

    handles = [m.register_forward_hook(partial(hook, name)) for name, m in modules.items()]
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.no_grad():
            losses = validation.per_sample_losses(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    tokens = losses[0].numel() if losses.dim() > 1 else 1
    return {"rows": rows, "positions": {n: max(1, v) for n, v in seen.items()}, "tokens": tokens}
