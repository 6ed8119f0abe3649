"""The on-disk format of a trajectory recording: names, the manifest's schema, hyperparameter rows.

A recording is a directory holding

* ``manifest.json``: the header and the commit point: parameter names, shapes and param-group
  index, the optimizer family and class, ``every``, and every data file with its byte size and
  CRC-32. Files it does not list do not exist for readers.
* ``chunk-NNNNNNNNN.npz``: ``chunk_steps`` consecutive steps (:data:`CHUNK_ARRAYS`, and with
  ``every=1`` ``theta [S, P]`` (+ ``grad``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``)).
* ``ckpt-NNNNNNNNN.npz`` (``every > 1``): ``theta [P]`` and the optimizer state before step N.

Readers accept only data files named like that, directly inside the directory (no symlinks).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from inrun_shapley.errors import LogError
from inrun_shapley.optim import adam, sgd

FORMAT_NAME = "inrun-shapley-trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HYPER_FIELDS = (
    "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "maximize", "amsgrad",
    "momentum", "dampening", "nesterov",
)
"""Columns of a step's ``hyper [G, F]`` array, one row per param group."""
FAMILIES = ("adam", "sgd")
CHUNK_ARRAYS = ("step", "ids", "offsets", "hyper", "opt_step", "had_buffer", "updated", "grad_norm", "theta_end")
"""Arrays every chunk file holds."""
STATE_KEYS = {"adam": adam.STATE_KEYS, "sgd": sgd.STATE_KEYS}
"""The optimizer state tensors recorded per family (torch's names)."""

_DATA_NAME = re.compile(r"^(chunk|ckpt)-[0-9]{6,12}\.npz$")


def chunk_name(first_step: int) -> str:
    return f"chunk-{first_step:09d}.npz"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.npz"


# ------------------------------------------------------------------------------ hyperparameters
def hyper_row(family: str, group: dict) -> list[float]:
    """One row of :data:`HYPER_FIELDS` from a torch param group (read by the family's ``hyper``)."""
    if family == "adam":
        h = adam.hyper(group)
        return [h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, float(h.decoupled), float(h.maximize),
                float(h.amsgrad), 0.0, 0.0, 0.0]
    h = sgd.hyper(group)
    return [h.lr, 0.0, 0.0, 0.0, h.weight_decay, 0.0, float(h.maximize), 0.0, h.momentum, h.dampening,
            float(h.nesterov)]


def group_from_row(family: str, row: np.ndarray) -> dict:
    """A torch-style param group (torch's keys, no ``params``) from a row of :data:`HYPER_FIELDS`."""
    f = {name: float(row[i]) for i, name in enumerate(HYPER_FIELDS)}
    if family == "adam":
        return {"lr": f["lr"], "betas": (f["beta1"], f["beta2"]), "eps": f["eps"],
                "weight_decay": f["weight_decay"], "decoupled_weight_decay": bool(f["decoupled"]),
                "amsgrad": bool(f["amsgrad"]), "maximize": bool(f["maximize"])}
    return {"lr": f["lr"], "weight_decay": f["weight_decay"], "momentum": f["momentum"],
            "dampening": f["dampening"], "nesterov": bool(f["nesterov"]), "maximize": bool(f["maximize"])}


# ------------------------------------------------------------------------------ validation
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_problems(entry, where: str, keys: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where} is not an object"]
    out = []
    if not isinstance(entry.get("file"), str) or not _DATA_NAME.match(entry["file"]):
        out.append(f"{where}.file {entry.get('file')!r} is not a data file name (chunk-N.npz / ckpt-N.npz)")
    for k in ("bytes", "crc32") + keys:
        if not _is_int(entry.get(k)) or entry[k] < 0:
            out.append(f"{where}.{k} is missing or not a non-negative integer")
    return out


def manifest_problems(m) -> list[str]:
    """Everything wrong with a manifest's fields (empty: usable). Never raises."""
    if not isinstance(m, dict):
        return ["the manifest is not a JSON object"]
    out = []
    if not isinstance(m.get("run_id"), str):
        out.append("run_id is missing or not a string")
    if m.get("optimizer") not in FAMILIES:
        out.append(f"optimizer {m.get('optimizer')!r} is not one of {FAMILIES}")
    if not isinstance(m.get("optimizer_class"), str):
        out.append("optimizer_class is missing or not a string")
    if not _is_int(m.get("every")) or m["every"] < 1:
        out.append("every is missing or not an integer >= 1")
    if not isinstance(m.get("optimizer_state", True), bool):
        out.append("optimizer_state is not a boolean")
    dtype = getattr(torch, m["dtype"], None) if isinstance(m.get("dtype"), str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        out.append(f"dtype {m.get('dtype')!r} is not a torch floating dtype")
    params = m.get("params")
    if not isinstance(params, list) or not params:
        out.append("params is missing or empty")
    else:
        for i, p in enumerate(params):
            ok = (isinstance(p, dict) and isinstance(p.get("name"), str) and _is_int(p.get("group"))
                  and p["group"] >= 0 and isinstance(p.get("shape"), list)
                  and all(_is_int(s) and s >= 0 for s in p["shape"]))
            if not ok:
                out.append(f"params[{i}] needs a string name, a list of non-negative int shape, an int group")
    for k in ("first_step", "last_step", "n_groups"):
        if not _is_int(m.get(k)):
            out.append(f"{k} is missing or not an integer")
    if m.get("hyper_fields", list(HYPER_FIELDS)) != list(HYPER_FIELDS):
        out.append(f"hyper_fields {m.get('hyper_fields')!r} differ from this library's {list(HYPER_FIELDS)}")
    chunks, ckpts = m.get("chunks"), m.get("checkpoints", [])
    if not isinstance(chunks, list):
        out.append("chunks is missing or not a list")
    else:
        bad = [q for i, c in enumerate(chunks) for q in _entry_problems(c, f"chunks[{i}]", ("first_step", "last_step"))]
        out += bad
        if not bad:
            spans = [(c["first_step"], c["last_step"]) for c in chunks]
            if any(a > b for a, b in spans) or any(spans[i][1] >= spans[i + 1][0] for i in range(len(spans) - 1)):
                out.append(f"chunk step ranges are empty, unordered or overlapping: {spans[:10]}")
    if not isinstance(ckpts, list):
        out.append("checkpoints is not a list")
    else:
        for i, c in enumerate(ckpts):
            out += _entry_problems(c, f"checkpoints[{i}]", ("step",))
    if "bytes_per_step" in m and not isinstance(m["bytes_per_step"], (int, float)):
        out.append("bytes_per_step is not a number")
    return out


def data_file(root: Path, name: str) -> Path:
    """``root/name`` for a data file listed in the manifest, refusing anything that is not a plain
    data file directly inside ``root`` (``../x``, absolute paths, other names, symlinks).

    Raises:
        LogError: the name or the file is refused.
    """
    if not isinstance(name, str) or not _DATA_NAME.match(name):
        raise LogError(f"{root}: the manifest lists {name!r}, which is not a data file name of this format")
    path = root / name
    if path.is_symlink():
        raise LogError(f"{path}: a symbolic link; recordings hold plain files only")
    if path.resolve().parent != root.resolve():
        raise LogError(f"{path}: resolves outside the recording {root}")
    return path


def missing_step_ranges(steps: np.ndarray) -> list[tuple[int, int]]:
    """Gaps in a sorted step sequence, as inclusive ``(first, last)`` ranges."""
    steps = np.asarray(steps, dtype=np.int64)
    if len(steps) < 2:
        return []
    jumps = np.flatnonzero(np.diff(steps) > 1)
    return [(int(steps[j]) + 1, int(steps[j + 1]) - 1) for j in jumps]
