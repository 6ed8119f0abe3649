"""Ghost forms of ``nn.Linear`` and ``nn.Embedding``: pairwise dot products of two samples'
gradients without forming either gradient (docs/math.md §5.1).

For a layer whose weight gradient is a sum of outer products, the dot product of a training
sample's contribution ``c_i`` with a query sample's gradient ``g_q`` needs neither of them:

* ``nn.Linear`` (inputs ``a``, output gradients ``b``, any number of positions)::

      <c_i, g_q> = sum_{t,s} (a_it · a_qs) (b_it · b_qs)          cost ~ T·S·(d_in + d_out)

* ``nn.Embedding`` (token ids ``x``): the token-match form::

      <c_i, g_q> = sum_{t,s} [x_it == x_qs] (b_it · b_qs)          cost ~ T·S·d

The activations of different query samples are never summed before the outer product: each
query keeps its own rows (summing them scores against the gradient of the summed loss, not of
each query).

Preconditioners. A value is ``sign·lr·k · <c_i, P ⊙ g_q>``. With no ``P`` (SGD, the SGD-form
estimator) the forms are exact. Adam's ``P`` sits between the two gradients; for Linear weights
it is replaced by a rank-1 approximation ``P ≈ u wᵀ`` (the "linearized ghost approximation"),
which moves into the query factors: ``a_qs ← a_qs ⊙ w``, ``b_qs ← b_qs ⊙ u``. The factorization
is Adafactor-style on ``D = (1/P)² = (sqrt(v̂) + eps)²`` (≈ ``v̂``): ``D ≈ r cᵀ / mean(D)`` with
the row means ``r`` and column means ``c``, then ``P̃ = 1/sqrt(D̃)``; exact when ``P`` is rank-1.
Embedding weights and all biases keep the exact ``P`` (gathered at the training sample's tokens).

The engine (``inrun_shapley.engine.queries``) decides which layers take these forms, captures the
query side and calls :func:`prepare_query_side` and :func:`ghost_dot`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from inrun_shapley.capture.registry import Capture, up

__all__ = ["GHOST_KINDS", "ghost_dot", "ghost_kind", "gram_product", "prepare_query_side", "rank_one_precond",
           "token_match"]

GHOST_KINDS = ("linear", "embedding")
_MAX_BLOCK = 1 << 22  # elements of one [rows·positions, query rows, tokens, positions] block


def ghost_kind(module: nn.Module) -> str:
    """``"embedding"`` or ``"linear"``: which ghost form a ghost-path layer takes."""
    return "embedding" if isinstance(module, nn.Embedding) else "linear"


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


# --------------------------------------------------------------------- pairwise products
def _blocks(n_pairs_per_row: int, m: int) -> int:
    return max(1, min(m, _MAX_BLOCK // max(1, n_pairs_per_row)))


def gram_product(a: Tensor, b: Tensor, a_q: Tensor, b_q: Tensor) -> Tensor:
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


def token_match(idx: Tensor, b: Tensor, idx_q: Tensor, b_q: Tensor) -> Tensor:
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


# --------------------------------------------------------------------- per parameter

def prepare_query_side(kind: str, pname: str, scale: float, precond: Tensor | None, a_q: Tensor,
                       b_q: Tensor) -> dict:
    """Fold one step's scalar and preconditioner into one parameter's query-side factors.

    Args:
        kind: ``"linear"`` or ``"embedding"``.
        pname: ``"weight"`` or ``"bias"``.
        scale: ``sign·lr·k`` (``sign·lr`` for the SGD-form estimator).
        precond: ``P`` of the parameter (same shape), or None for 1.
        a_q: query inputs ``[m, S, d_in]`` (Embedding: token ids ``[m, S]``).
        b_q: query output gradients ``[m, K, S, d_out]`` (``K`` queries per row).

    Returns:
        the entry :func:`ghost_dot` reads: bias ``{"direction": [m·K, d_out]}`` (exact);
        Embedding weight ``{"idx", "b", "precond"}`` (exact ``P``); Linear weight ``{"a", "b"}``
        with the rank-1 ``P`` folded in.
    """
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


def ghost_dot(module: nn.Module, capture: Capture, n: int, entry: dict) -> Tensor:
    """``[n, m·K]`` values of the ``n`` training samples of one captured call against one query
    chunk, from the chunk's prepared entries ``{"weight": ..., "bias": ...}``
    (:func:`prepare_query_side`); 0 when the entry has neither."""
    b = up(capture.grad_output)
    b = b.reshape(n, -1, b.shape[-1])  # [n, T, d_out]
    total = 0
    if "bias" in entry:
        total = total + b.sum(1) @ entry["bias"]["direction"].T
    w = entry.get("weight")
    if w is None:
        return total
    if ghost_kind(module) == "embedding":
        idx = capture.args[0].reshape(n, -1)
        if module.padding_idx is not None:
            b = b.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
        if w["precond"] is not None:
            b = b * w["precond"].to(b.dtype)[idx]
        return total + token_match(idx, b, w["idx"], w["b"])
    a = up(capture.args[0])
    a = a.reshape(n, -1, a.shape[-1])
    return total + gram_product(a, b, w["a"], w["b"])
