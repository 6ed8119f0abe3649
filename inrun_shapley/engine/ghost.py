"""Ghost dot products: per-query values without per-query gradients (DESIGN.md §2).

The exact per-query path forms every query's gradient ``g_q`` (``Q`` copies of the tracked
parameters) and maps each training sample's captures through each of them. For a layer whose
weight gradient is a sum of outer products, the pairwise dot product of two gradients needs
neither of them:

* ``nn.Linear`` (inputs ``a``, output gradients ``b``, any number of positions)::

      <c_i, g_q> = sum_{t,s} (a_it · a_qs) (b_it · b_qs)          cost ~ T·S·(d_in + d_out)

* ``nn.Embedding`` (token ids ``x``): the token-match form::

      <c_i, g_q> = sum_{t,s} [x_it == x_qs] (b_it · b_qs)          cost ~ T·S·d

The query side (``a_q``, ``b_q`` of every query sample) is captured during the per-query
validation pass. Queries do not interact, so ONE backward of the SUM of the query losses gives
every query row its own ``b_q`` (per-token queries: one backward per token position, batched).
The activations of different query samples are never summed before the outer product: each
query keeps its own rows (summing them is the pitfall of DESIGN.md §2: it scores against the
gradient of the summed loss, not of each query).

Preconditioners. A value is ``sign·lr·k · <c_i, P ⊙ g_q>``. SGD (``P = 1``) and the SGD-form
estimator are exact. Adam's ``P`` sits between the two gradients; for Linear weights it is
replaced by a rank-1 approximation ``P ≈ u wᵀ`` (the "linearized ghost approximation"), which
moves into the factors: ``a_qs ← a_qs ⊙ w``, ``b_qs ← b_qs ⊙ u``. The factorization is
Adafactor-style on ``D = (1/P)² = (sqrt(v̂) + eps)²`` (≈ ``v̂``): ``D ≈ r cᵀ / mean(D)`` with the
row means ``r`` and column means ``c``, then ``P̃ = 1/sqrt(D̃)``. It is exact when ``P`` is rank-1
and an approximation otherwise (measure its error: ``tests/test_ghost.py``). Embedding weights
and all biases keep the exact ``P`` (it is gathered at the training sample's own tokens).

Layers without a ghost form (norms, attention through the JVP rule, convolutions, custom
modules) and parameters shared between modules stay on the exact path; the two parts add up.
The leave-one-out estimator's Jacobian can change sign, so it has no rank-1 factorization
here: ``query_path="ghost"`` refuses it and ``"auto"`` keeps it exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from inrun_shapley.capture.registry import Capture, up
from inrun_shapley.errors import ConfigurationError, SampleIdError

QUERY_PATHS = ("auto", "exact", "ghost")
GHOST_KINDS = ("linear", "embedding")
_MAX_BLOCK = 1 << 22  # elements of one [rows·positions, query rows, tokens, positions] block


# --------------------------------------------------------------------- preconditioner
def rank_one_precond(precond: Tensor) -> tuple[Tensor, Tensor]:
    """Rank-1 approximation ``P ≈ u wᵀ`` of a positive 2-D preconditioner.

    Adafactor-style on ``D = P⁻²`` (for Adam ``(sqrt(v̂) + eps)²``): ``D̃ = r cᵀ / mean(D)``
    with ``r``, ``c`` the row and column means, then ``P̃ = D̃^{-1/2}``. Exact when ``P`` is
    rank-1.

    Args:
        precond: ``[d_out, d_in]`` positive preconditioner.

    Returns:
        ``(u [d_out], w [d_in])`` in ``precond``'s dtype.
    """
    d = precond.double().reciprocal().square()
    r, c, mean = d.mean(1), d.mean(0), d.mean()
    u = r.rsqrt()
    w = (mean / c).sqrt()
    return u.to(precond.dtype), w.to(precond.dtype)


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
        self.kinds = {n: ("embedding" if isinstance(m, nn.Embedding) else "linear") for n, m in self.modules.items()}
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
                try:
                    grads = torch.autograd.grad(flat, outs, grad_outputs=eye.reshape(k, *losses.shape),
                                                is_grads_batched=True, allow_unused=True, retain_graph=True)
                except RuntimeError:  # an op without a vmap rule: one backward per token position
                    per = [torch.autograd.grad(flat[:, j].sum(), outs, allow_unused=True, retain_graph=True)
                           for j in range(k)]
                    grads = [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(outs))]
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
    def prepare(self, terms: Mapping[int, object], estimator: str) -> None:
        """Fold ``sign·lr·k`` and the preconditioner of every ghost parameter into the query side.

        Args:
            terms: ``{id(param): StepTerms or None}`` for this step.
            estimator: ``"shapley"`` (``P`` and ``k`` used) or ``"sgd"`` (``lr`` and sign only).
        """
        if estimator not in ("shapley", "sgd"):
            raise ConfigurationError(f"the ghost path supports estimators 'shapley' and 'sgd', not {estimator!r}")
        self._prepared = []
        for chunk in self.chunks:
            prepared: dict[str, dict] = {}
            for name, (a_q, b_q) in chunk.items():
                module = self.modules[name]
                entry: dict = {}
                for pname, p in module.named_parameters(recurse=False):
                    t = terms.get(id(p))
                    if t is None or not p.requires_grad:
                        continue
                    scale = t.sign * t.lr * (t.coeff if estimator == "shapley" else 1.0)
                    precond = t.precond if estimator == "shapley" else None
                    entry[pname] = self._prepare_param(self.kinds[name], pname, scale, precond, a_q, b_q)
                if entry:
                    prepared[name] = entry
            self._prepared.append(prepared)

    @staticmethod
    def _prepare_param(kind: str, pname: str, scale: float, precond: Tensor | None, a_q: Tensor, b_q: Tensor) -> dict:
        if pname == "bias":  # exact: M_b[q] = scale · P_b ⊙ sum_s b_qs
            m = b_q.sum(2) * scale  # [m, K, d_out]
            if precond is not None:
                m = m * precond.to(m.dtype)
            return {"direction": m.reshape(-1, m.shape[-1])}
        if kind == "embedding":  # exact P, gathered at the training tokens
            return {"idx": a_q, "b": b_q * scale, "precond": precond}
        if precond is None:
            return {"a": a_q, "b": b_q * scale}
        u, w = rank_one_precond(precond.to(a_q.dtype))
        return {"a": a_q * w, "b": b_q * (u * scale)}

    def dot(self, name: str, capture: Capture, n: int) -> Tensor:
        """``[n, Q]`` values of the ``n`` training samples of one captured call of layer ``name``."""
        parts = []
        for chunk_rows, prepared in zip(self.chunk_rows, self._prepared):
            entry = prepared.get(name)
            if entry is None:
                parts.append(None)
                continue
            parts.append(self._dot_chunk(name, capture, n, entry))
        ref = next((p for p in parts if p is not None), None)
        if ref is None:
            return torch.zeros(n, self.n_queries, dtype=up(capture.grad_output).dtype, device=capture.grad_output.device)
        return torch.cat([
            p if p is not None else torch.zeros(n, rows * self.tokens, dtype=ref.dtype, device=ref.device)
            for p, rows in zip(parts, self.chunk_rows)
        ], dim=1)

    def _dot_chunk(self, name: str, capture: Capture, n: int, entry: dict) -> Tensor:
        module = self.modules[name]
        b = up(capture.grad_output)
        b = b.reshape(n, -1, b.shape[-1])  # [n, T, d_out]
        total = 0
        if "bias" in entry:
            total = total + b.sum(1) @ entry["bias"]["direction"].T
        w = entry.get("weight")
        if w is None:
            return total
        if self.kinds[name] == "embedding":
            idx = capture.args[0].reshape(n, -1)
            if module.padding_idx is not None:
                b = b.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
            if w["precond"] is not None:
                b = b * w["precond"].to(b.dtype)[idx]
            return total + _token_match(idx, b, w["idx"], w["b"])
        a = up(capture.args[0])
        a = a.reshape(n, -1, a.shape[-1])
        return total + _gram_product(a, b, w["a"], w["b"])


def _blocks(n_pairs_per_row: int, m: int) -> int:
    return max(1, min(m, _MAX_BLOCK // max(1, n_pairs_per_row)))


def _gram_product(a: Tensor, b: Tensor, a_q: Tensor, b_q: Tensor) -> Tensor:
    """``out[i, (r, k)] = sum_{t,s} (a_it · a_q[r,s]) (b_it · b_q[r,k,s])``.

    Args:
        a: ``[n, T, d_in]``, b: ``[n, T, d_out]`` training captures.
        a_q: ``[m, S, d_in]``, b_q: ``[m, K, S, d_out]`` query captures (each row its own).
    """
    n, t, d_in = a.shape
    m, k, s, d_out = b_q.shape
    a2, b2 = a.reshape(n * t, d_in), b.reshape(n * t, -1)
    step = _blocks(n * t * k * s, m)
    cols = []
    for r0 in range(0, m, step):
        aq, bq = a_q[r0:r0 + step], b_q[r0:r0 + step]
        mr = aq.shape[0]
        ga = (a2 @ aq.reshape(mr * s, d_in).T).view(n * t, mr, 1, s)
        gb = (b2 @ bq.reshape(mr * k * s, d_out).T).view(n * t, mr, k, s)
        cols.append((ga * gb).sum(-1).view(n, t, mr * k).sum(1))
    return torch.cat(cols, dim=1)


def _token_match(idx: Tensor, b: Tensor, idx_q: Tensor, b_q: Tensor) -> Tensor:
    """``out[i, (r, k)] = sum_{t,s} [idx_it == idx_q[r,s]] (b_it · b_q[r,k,s])``."""
    n, t = idx.shape
    m, k, s, d = b_q.shape
    i2, b2 = idx.reshape(n * t), b.reshape(n * t, d)
    step = _blocks(n * t * k * s, m)
    cols = []
    for r0 in range(0, m, step):
        iq, bq = idx_q[r0:r0 + step], b_q[r0:r0 + step]
        mr = iq.shape[0]
        match = (i2.view(-1, 1, 1) == iq.to(i2.device).view(1, mr, s)).to(b.dtype).view(n * t, mr, 1, s)
        gb = (b2 @ bq.reshape(mr * k * s, d).T).view(n * t, mr, k, s)
        cols.append((match * gb).sum(-1).view(n, t, mr * k).sum(1))
    return torch.cat(cols, dim=1)


# --------------------------------------------------------------------- planning
def plan_query_path(path: str, modules: Mapping[str, tuple], *, estimator: str, validation, model: nn.Module,
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
        elif estimator == "loo":
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
    from inrun_shapley.engine.validation import eval_mode

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
