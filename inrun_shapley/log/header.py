"""The header of a value log (``meta.json``): schema, validation, and the score description.

Every reader goes through :func:`read_header`, which checks each key's type and returns a
normalized copy (optional keys filled in), so that a wrong-typed field, a missing key or garbage
JSON is always a :class:`~inrun_shapley.errors.LogError` naming the key, never a stray
``KeyError``/``TypeError`` later on.

**Score description** (``"score"``, format version 2). A log says what its numbers mean::

    "score": {"kind": "inrun_shapley",
              "positive_means": "the sample lowered the validation loss ...",
              "helpful_sign": 1}

``helpful_sign`` is +1 when a higher score means a more helpful sample, -1 when a higher score
means a more harmful one (e.g. counterfactual influence on a *loss*: positive = including the
sample raises the loss), and null when the direction is unknown (a custom output function).
Pruning and ranking convert with it and refuse a null sign.

**Version 1 logs** (written before the score description existed) are read as follows: a
header whose ``metadata.kind`` is ``"adjoint_influence"`` (the adjoint pass wrote such logs)
is an ``"adjoint"`` score with ``helpful_sign`` null, since its output function is not recorded;
every other version 1 log is an In-Run Shapley log (``helpful_sign`` +1), which is what the
writer produced.
"""

from __future__ import annotations

import json
import numbers
import time
from pathlib import Path
from typing import Any, Callable

from inrun_shapley.errors import ConfigurationError, LogError
from inrun_shapley.log.format import DATA_FILE, FORMAT_NAME, FORMAT_VERSION, META_FILE, inside

INRUN_SHAPLEY = "inrun_shapley"
INRUN_POSITIVE_MEANS = (
    "the sample's presence in its optimizer steps lowered the validation loss "
    "(units of validation loss)"
)
HELPFUL_SIGNS = (1, -1, None)
MAX_QUERIES = 2**24  # a sanity bound for n_queries read from a header


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def score_description(kind: Any, positive_means: Any, helpful_sign: Any) -> dict[str, Any]:
    """A checked ``"score"`` header entry.

    Raises:
        ConfigurationError: ``kind`` or ``positive_means`` not a non-empty string, or
            ``helpful_sign`` not one of 1, -1, None.
    """
    if not isinstance(kind, str) or not kind:
        raise ConfigurationError(f"score_kind must be a non-empty string, got {kind!r}")
    if not isinstance(positive_means, str) or not positive_means:
        raise ConfigurationError(f"positive_means must be a non-empty string, got {positive_means!r}")
    if helpful_sign is not None and (not _is_int(helpful_sign) or helpful_sign not in (1, -1)):
        raise ConfigurationError(
            f"helpful_sign must be 1 (higher = more helpful), -1 (higher = more harmful) or None "
            f"(unknown), got {helpful_sign!r}"
        )
    return {"kind": kind, "positive_means": positive_means,
            "helpful_sign": None if helpful_sign is None else int(helpful_sign)}


def default_score() -> dict[str, Any]:
    """The description of In-Run Shapley values (positive = helpful)."""
    return score_description(INRUN_SHAPLEY, INRUN_POSITIVE_MEANS, 1)


def _v1_score(metadata: dict[str, Any]) -> dict[str, Any]:
    if metadata.get("kind") == "adjoint_influence":
        sign = metadata.get("sign")
        means = sign if isinstance(sign, str) and sign else "including the sample raises the query output f_q"
        return score_description("adjoint", means, None)
    return default_score()


class _Checker:
    """Type checks that raise LogError naming the header and the key."""

    def __init__(self, meta: Path) -> None:
        self.meta = meta

    def fail(self, key: str, what: str, value: Any) -> LogError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return LogError(f"{self.meta}: {key!r} must be {what}, found {shown}; the header is corrupt")

    def int(self, value: Any, key: str, low: int = 0, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if not _is_int(value) or value < low:
            raise self.fail(key, f"an int >= {low}" + (" or null" if optional else ""), value)
        return int(value)

    def entry(self, value: Any, key: str, prefix: str, rows: bool) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a file entry {file, bytes, crc32}", value)
        name = value.get("file")
        if not isinstance(name, str) or not DATA_FILE.match(name) or not name.startswith(prefix):
            raise self.fail(f"{key}.file", f"a '{prefix}NNNNNN' data file name", name)
        out = dict(value, file=name, bytes=self.int(value.get("bytes"), f"{key}.bytes"),
                   crc32=self.int(value.get("crc32"), f"{key}.crc32"))
        if rows:
            out["rows"] = self.int(value.get("rows"), f"{key}.rows")
        return out

    def chunk(self, value: Any, key: str, record_steps: bool) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a chunk entry", value)
        out = dict(value)
        for k in ("first_step", "last_step", "n_steps"):
            out[k] = self.int(value.get(k), f"{key}.{k}")
        out["stats"] = self.entry(value.get("stats"), f"{key}.stats", "stats-", rows=True)
        steps = value.get("steps")
        if steps is None and record_steps:
            raise LogError(f"{self.meta}: {key} lacks its per-step records (record_steps is true); the log is corrupt")
        out["steps"] = None if steps is None else self.entry(steps, f"{key}.steps", "steps-", rows=True)
        return out


def validate_header(header: Any, meta: Path) -> dict[str, Any]:
    """A normalized copy of a parsed header, every key type-checked.

    Raises:
        LogError: not a log header, unsupported version, a missing key or a wrong type.
    """
    check = _Checker(meta)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise LogError(f"{meta}: not an inrun-shapley log header (format field missing or wrong)")
    version = header.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise LogError(
            f"{meta}: format_version {version!r} is not supported (this library reads 1 to "
            f"{FORMAT_VERSION}); upgrade inrun-shapley"
        )
    for key in ("last_step", "generation", "chunks", "totals"):
        if key not in header:
            raise LogError(f"{meta}: header lacks {key!r}; the log is corrupt")
    out = dict(header)
    out["last_step"] = check.int(header["last_step"], "last_step")
    out["generation"] = check.int(header["generation"], "generation")
    for key in ("n_steps", "degenerate_steps"):
        out[key] = check.int(header.get(key, 0), key)
    out["first_step"] = check.int(header.get("first_step"), "first_step", optional=True)
    out["n_queries"] = check.int(header.get("n_queries"), "n_queries", low=1, optional=True)
    if out["n_queries"] is not None and out["n_queries"] > MAX_QUERIES:
        raise check.fail("n_queries", f"at most {MAX_QUERIES}", out["n_queries"])
    groups = header.get("group_names")
    if groups is not None and (
        not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups)
        or len(set(groups)) != len(groups)
    ):
        raise check.fail("group_names", "null or a non-empty list of unique strings", groups)
    record_steps = header.get("record_steps", False)
    if not isinstance(record_steps, bool):
        raise check.fail("record_steps", "true or false", record_steps)
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise check.fail("metadata", "an object", metadata)

    std_source = header.get("std_source")
    if std_source is not None and not isinstance(std_source, str):
        raise check.fail("std_source", "null or a string", std_source)
    out.update(group_names=groups, record_steps=record_steps, std_source=std_source, metadata=dict(metadata))
    totals = header["totals"]
    out["totals"] = None if totals is None else check.entry(totals, "totals", "totals-", rows=False)
    deltas = header.get("deltas", [])
    if not isinstance(deltas, list):
        raise check.fail("deltas", "a list", deltas)
    out["deltas"] = [check.entry(d, f"deltas[{k}]", "delta-", rows=True) for k, d in enumerate(deltas)]
    if not isinstance(header["chunks"], list):
        raise check.fail("chunks", "a list", header["chunks"])
    out["chunks"] = [check.chunk(c, f"chunks[{k}]", record_steps) for k, c in enumerate(header["chunks"])]
    if version == 1 and "score" not in header:
        out["score"] = _v1_score(out["metadata"])
    else:
        score = header.get("score")
        if not isinstance(score, dict):
            raise check.fail("score", "an object {kind, positive_means, helpful_sign}", score)
        try:
            out["score"] = score_description(score.get("kind"), score.get("positive_means"), score.get("helpful_sign"))
        except ConfigurationError as exc:
            raise LogError(f"{meta}: bad 'score' entry ({exc}); the header is corrupt") from exc
    return out


def read_header(root: Path) -> dict[str, Any]:
    """Read and validate ``root/meta.json``.

    Raises:
        LogError: no such directory, no header, a symlinked header, garbage JSON, or any
            header field missing or of the wrong type.
    """
    if not root.exists():
        raise LogError(f"{root}: no such value log")
    if not root.is_dir():
        raise LogError(f"{root}: a value log is a directory, found a file")
    meta = root / META_FILE
    if not meta.exists() and not meta.is_symlink():
        raise LogError(f"{meta}: missing; {root} is not a value log (or nothing was ever flushed)")
    inside(root, META_FILE, "the header")
    try:
        header = json.loads(meta.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LogError(f"{meta}: unreadable header ({exc}); the log is corrupt") from exc
    return validate_header(header, meta)


SNAPSHOT_RETRY_S = 30.0  # how long a reader keeps re-reading while a writer keeps committing


def read_snapshot(root: Path, read: Callable[[dict[str, Any]], Any]) -> Any:
    """``read(header)`` for the committed header, started again from the new header when a
    writer's commit removed files the old one listed (a compaction), for up to
    ``SNAPSHOT_RETRY_S`` seconds: the result is always one consistent snapshot.

    Raises:
        LogError: ``read``'s error, when the header did not change meanwhile (the log itself is
            damaged) or the retries ran out.
    """
    deadline = time.monotonic() + SNAPSHOT_RETRY_S
    while True:
        header = read_header(root)
        try:
            return read(header)
        except LogError:
            try:
                now_generation = read_header(root)["generation"]
            except LogError:
                now_generation = None
            if time.monotonic() > deadline or now_generation == header["generation"]:
                raise


__all__ = ["HELPFUL_SIGNS", "INRUN_SHAPLEY", "SNAPSHOT_RETRY_S", "default_score", "read_header", "read_snapshot",
           "score_description", "validate_header"]
