"""Document-level values: a document split across many training sequences gets their sum.

A language model trains on fixed-length sequences; a document (a web page, a file, a book) is
cut into many of them, and the tracker logs one value per *sequence id* (the dataset index of
the sequence). Decisions about data are made per document, so a document's value is the sum of
its sequences' values, as In-Run Data Shapley's corpus-level values are: the total effect the
document's tokens had on the validation loss over the run. A long document therefore weighs
more than a short one with the same per-token effect; divide by the sequence count
(``reduce="mean"``) to compare documents per token instead.

Example:
    >>> import numpy as np
    >>> seq_scores = np.array([0.5, -0.1, 0.2, np.nan, -0.4])   # sequence 3 never seen
    >>> doc_of = np.array([0, 0, 1, 2, 1])                        # the document of each sequence
    >>> document_values(seq_scores, doc_of).tolist()               # doc 2: no seen sequence
    [0.4, -0.2, nan]
    >>> from inrun_shapley.pruning import prune
    >>> prune(document_values(seq_scores, doc_of), fraction="auto").tolist()  # keep the doc ids
    [0, 2]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.log import NORMALIZATIONS, ShapleyLog
from inrun_shapley.log.accumulator import check_ids
from inrun_shapley.pruning import array_scores

REDUCTIONS = ("sum", "mean")


def _sequence_scores(log_or_scores: Any, normalize: str, query: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(seen sequence ids [n] sorted, their helpfulness [n])``."""
    if isinstance(log_or_scores, ShapleyLog):
        if normalize not in NORMALIZATIONS:
            raise ConfigurationError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        log = log_or_scores
        q = "mean" if log.n_queries is not None and query is None else query
        return log.ids.copy(), log.helpfulness(normalize, q, ids=log.ids, purpose="document_values()")
    return array_scores(log_or_scores, "sequence id")


def document_values(
    log_or_scores: ShapleyLog | np.ndarray,
    doc_of: Any,
    *,
    seq_ids: Any = None,
    n_docs: int | None = None,
    normalize: str = "step_std",
    query: int | str | None = None,
    reduce: str = "sum",
) -> np.ndarray:
    """Per-document helpfulness from per-sequence values.

    Args:
        log_or_scores: a :class:`~inrun_shapley.log.ShapleyLog` (read as
            :meth:`~inrun_shapley.log.ShapleyLog.helpfulness`, so higher = more helpful whatever
            the log's sign; a per-query log by the mean over queries unless ``query`` picks a
            column), or a 1-D score array indexed by sequence id (higher = more helpful; NaN
            marks sequences never seen).
        doc_of: ``[n_seq]`` int document id of each sequence: indexed by sequence id, or
            aligned to ``seq_ids`` when given.
        seq_ids: ``[n_seq]`` the sequence ids ``doc_of`` describes (for sparse sequence ids:
            hashes, global row numbers); None means ``0 .. len(doc_of) - 1``.
        n_docs: number of documents (ids ``0 .. n_docs - 1``); default ``max(doc_of) + 1``.
        normalize: the log's score (see :meth:`~inrun_shapley.log.ShapleyLog.scores`;
            ``"step_std"``, the default ranking, keeps each value's sign). Ignored for arrays.
        query: column of a per-query log (None = mean over queries).
        reduce: ``"sum"`` (the document's total effect; the default) or ``"mean"`` (per seen
            sequence).

    Returns:
        ``[n_docs]`` float64, higher = more helpful; NaN for a document none of whose sequences
        was seen (so :func:`inrun_shapley.prune` treats it as unseen).

    Raises:
        ConfigurationError: bad ``normalize``, ``reduce`` or score array.
        SampleIdError: a scored sequence id has no document (``doc_of`` too short, or missing
            from ``seq_ids``), negative or duplicated ids, ``n_docs`` not above the largest
            document id, or ``doc_of`` and ``seq_ids`` of different lengths.
        LogError: the log's ``helpful_sign`` is null.
    """
    if reduce not in REDUCTIONS:
        raise ConfigurationError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    docs = check_ids(np.asarray(doc_of), "doc_of")
    seen, helpful = _sequence_scores(log_or_scores, normalize, query)
    if seq_ids is None:
        if seen.size and int(seen[-1]) >= docs.shape[0]:
            raise SampleIdError(
                f"doc_of has {docs.shape[0]} entries (sequence ids 0..{docs.shape[0] - 1}) but sequence id "
                f"{int(seen[-1])} is scored: pass the document of every sequence the run trained on, or "
                "seq_ids=<the sequence ids doc_of is aligned to>"
            )
        doc_of_seen = docs[seen]
    else:
        ids = check_ids(np.asarray(seq_ids), "seq_ids")
        if ids.shape != docs.shape:
            raise SampleIdError(f"seq_ids and doc_of must have one entry per sequence, got {ids.shape} and {docs.shape}")
        order = np.argsort(ids, kind="stable")
        ids, docs_sorted = ids[order], docs[order]
        if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
            raise SampleIdError("seq_ids contain duplicates")
        pos = np.minimum(np.searchsorted(ids, seen), max(ids.size - 1, 0))
        missing = ~(ids[pos] == seen) if ids.size else np.ones(seen.shape[0], dtype=bool)
        if np.any(missing):
            raise SampleIdError(
                f"{int(missing.sum())} scored sequence ids are not in seq_ids (first: {int(seen[missing][0])}): "
                "pass the document of every sequence the run trained on"
            )
        doc_of_seen = docs_sorted[pos]
    size = int(docs.max()) + 1 if docs.size else 0
    if n_docs is not None:
        if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < size:
            raise SampleIdError(f"n_docs must be an int > the largest document id ({size - 1}), got {n_docs!r}")
        size = int(n_docs)
    total = np.bincount(doc_of_seen, weights=helpful, minlength=size)
    count = np.bincount(doc_of_seen, minlength=size)
    out = total if reduce == "sum" else total / np.maximum(count, 1)
    out = out.astype(np.float64)
    out[count == 0] = np.nan
    return out


def negative_share(doc_scores: Any) -> float:
    """Share of the scored (non-NaN) entries below zero: the fraction the negative-value rule
    (``prune(..., fraction="auto")``) drops. 0.0 when nothing is scored."""
    s = np.asarray(doc_scores, dtype=np.float64)
    s = s[~np.isnan(s)]
    return float((s < 0).mean()) if s.size else 0.0


__all__ = ["REDUCTIONS", "document_values", "negative_share"]
