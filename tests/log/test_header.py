"""A corrupt header is always a LogError: a table of corruptions and a fuzz over every key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inrun_shapley.errors import LogError
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter

from tests.log.helpers import make_steps

GROUPS = ["a", "b"]


@pytest.fixture(scope="module")
def header_and_files(tmp_path_factory):
    """A log with a base snapshot, deltas and chunks (flushed, never closed), as bytes."""
    path = tmp_path_factory.mktemp("fuzz") / "log"
    w = ShapleyLogWriter(path, group_names=GROUPS, flush_every=0, metadata={"seed": 1})
    for k, (step, ids, vals, _) in enumerate(make_steps(n_steps=6, batch=5, n_ids=30)):
        w.add_step(step, ids, vals, np.stack([vals / 2, vals / 2], axis=1))
        if k % 2:
            w.flush()
    header = json.loads((path / "meta.json").read_text())
    assert header["deltas"] and header["chunks"]
    return header, {p.name: p.read_bytes() for p in path.iterdir()}


def _fresh(tmp_path, files, meta: bytes | None = None):
    path = tmp_path / "log"
    path.mkdir(exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    if meta is not None:
        (path / "meta.json").write_bytes(meta)
    return path


def _only_log_errors(path):
    """Reading (and resuming) either works or raises LogError; anything else fails the test."""
    for open_log in (lambda: ShapleyLog.load(path), lambda: ShapleyLog.load(path, verify=False),
                     lambda: ShapleyLogWriter(path, resume=True, group_names=GROUPS)):
        try:
            open_log()
        except LogError:
            pass


GARBAGE = [
    b"", b"\xff\xfe\x00", b"null", b"[]", b"1", b'"text"', b"[" * 50_000, b'{"format": "inrun-shapley-log"}',
    b'{"format": "inrun-shapley-log", "format_version": NaN}', b'{"format": "inrun-shapley-log", "format_version": 2}',
]


@pytest.mark.parametrize("meta", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_header_is_a_log_error(tmp_path, header_and_files, meta):
    path = _fresh(tmp_path, header_and_files[1], meta)
    with pytest.raises(LogError):
        ShapleyLog.load(path)
    with pytest.raises(LogError):
        ShapleyLogWriter(path, resume=True)


def _set(header, keys, value):
    target = header
    for k in keys[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


_DELETE = object()

TABLE = [
    (("last_step",), "x", "'last_step' must be an int"),
    (("last_step",), 1.5, "'last_step' must be an int"),
    (("generation",), None, "'generation' must be an int"),
    (("chunks",), {}, "'chunks' must be a list"),
    (("chunks", 0), "x", r"'chunks\[0\]' must be a chunk entry"),
    (("chunks", 0, "stats"), None, r"'chunks\[0\].stats' must be a file entry"),
    (("chunks", 0, "stats", "file"), "../../etc/passwd", r"'chunks\[0\].stats.file' must be"),
    (("chunks", 0, "stats", "file"), "delta-000001.npz", r"'chunks\[0\].stats.file' must be"),
    (("chunks", 0, "stats", "rows"), "3", r"'chunks\[0\].stats.rows' must be an int"),
    (("chunks", 0, "steps"), None, "lacks its per-step records"),
    (("totals",), [], "'totals' must be a file entry"),
    (("totals", "bytes"), True, "'totals.bytes' must be an int"),
    (("totals", "crc32"), -1, "'totals.crc32' must be an int >= 0"),
    (("deltas",), "x", "'deltas' must be a list"),
    (("deltas", 0, "rows"), _DELETE, r"'deltas\[0\].rows' must be an int"),
    (("n_queries",), 0, "'n_queries' must be an int >= 1"),
    (("group_names",), "ab", "'group_names' must be null or a non-empty list"),
    (("group_names",), ["a", "a"], "'group_names' must be null or a non-empty list"),
    (("record_steps",), "yes", "'record_steps' must be true or false"),
    (("metadata",), [], "'metadata' must be an object"),
    (("std_source",), 3, "'std_source' must be null or a string"),
    (("score",), None, "'score' must be an object"),
    (("score", "helpful_sign"), 2, "bad 'score' entry"),
    (("last_step",), _DELETE, "header lacks 'last_step'"),
    (("format_version",), "2", "format_version '2' is not supported"),
    (("format_version",), 0, "format_version 0 is not supported"),
]


@pytest.mark.parametrize("keys, value, match", TABLE, ids=[f"{'.'.join(map(str, k))}={v!r}"[:40] for k, v, _ in TABLE])
def test_header_corruptions(tmp_path, header_and_files, keys, value, match):
    header = json.loads(json.dumps(header_and_files[0]))
    _set(header, keys, value)
    path = _fresh(tmp_path, header_and_files[1], json.dumps(header).encode())
    with pytest.raises(LogError, match=match):
        ShapleyLog.load(path)
    with pytest.raises(LogError):
        ShapleyLogWriter(path, resume=True, group_names=GROUPS)


def _key_paths(node, prefix=()):
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for k, v in items:
        yield prefix + (k,)
        yield from _key_paths(v, prefix + (k,))


REPLACEMENTS = [_DELETE, None, True, -1, 0, 1.5, 2**70, "x", "../meta.json", [], {}, [1], {"file": 1}]


def test_fuzz_every_key(tmp_path, header_and_files):
    header, files = header_and_files
    paths = list(_key_paths(header))
    assert len(paths) > 40
    for n, keys in enumerate(paths):
        for m, value in enumerate(REPLACEMENTS):
            if value is _DELETE and isinstance(keys[-1], int):
                continue
            corrupt = json.loads(json.dumps(header))
            _set(corrupt, keys, value)
            case = tmp_path / f"c{n}-{m}"
            case.mkdir()
            _only_log_errors(_fresh(case, files, json.dumps(corrupt).encode()))
