"""Reading a trajectory recording back: :class:`Recording` (lazily, chunk by chunk)."""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from inrun_shapley.errors import LogError
from inrun_shapley.trajectory.format import (
    CHUNK_ARRAYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    data_file,
    manifest_problems,
    missing_step_ranges,
)


@dataclass
class StepState:
    """Everything about one step ``s`` the adjoint pass uses (flat ``[P]`` tensors).

    ``theta`` = ``θ_s`` (before the step); ``grad`` = the gradient used; ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` = Adam's state after the step (None for SGD);
    ``hyper [G, F]`` (:data:`~inrun_shapley.trajectory.HYPER_FIELDS`),
    ``opt_step``/``had_buffer``/``updated`` per tensor.
    """

    step: int
    ids: np.ndarray
    hyper: np.ndarray
    opt_step: np.ndarray
    had_buffer: np.ndarray
    updated: np.ndarray
    grad_norm: float
    theta: Tensor | None = None
    grad: Tensor | None = None
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    max_exp_avg_sq: Tensor | None = None


def read_manifest(path: Path) -> dict:
    """The manifest of the recording at ``path``, checked field by field.

    Raises:
        LogError: missing, unreadable, not a trajectory recording, from a newer library, or
            with missing or wrong-typed fields (all of them listed).
    """
    mf = path / MANIFEST
    if not mf.is_file():
        raise LogError(
            f"no trajectory recording at {path} ({MANIFEST} missing): record the run with "
            "TrajectoryRecorder(path) attached to the tracker and call recorder.close() after training"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as err:
        raise LogError(f"{mf}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise LogError(f"{path} is not a trajectory recording (format {fmt!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise LogError(f"{mf}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise LogError(f"{path}: format_version {version} is newer than this library's ({FORMAT_VERSION}); upgrade")
    problems = manifest_problems(manifest)
    if problems:
        raise LogError(f"{mf}: damaged manifest: " + "; ".join(problems))
    return manifest


class Recording:
    """A recording written by :class:`~inrun_shapley.trajectory.TrajectoryRecorder`, read back
    (lazily, chunk by chunk).

    Use :meth:`load`. Attributes: ``path``, ``manifest`` (dict), ``steps`` (``[S]`` int64),
    ``names``/``shapes``/``groups`` of the recorded parameters, ``optimizer`` (``"adam"`` or
    ``"sgd"``), ``every``, ``n_params``.
    """

    def __init__(self, path: Path, manifest: dict, verify: bool):
        self.path = path
        self.manifest = manifest
        self.verify = verify
        self.names = [p["name"] for p in manifest["params"]]
        self.shapes = [tuple(p["shape"]) for p in manifest["params"]]
        self.groups = [int(p["group"]) for p in manifest["params"]]
        self.numels = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.n_params = int(sum(self.numels))
        self.optimizer = manifest["optimizer"]
        self.every = int(manifest["every"])
        self.dtype = getattr(torch, manifest["dtype"])
        self._chunks = manifest["chunks"]
        self._ckpts = {int(c["step"]): c for c in manifest.get("checkpoints", [])}
        self._cache: tuple[int, dict] | None = None
        self.steps = np.concatenate(
            [np.arange(c["first_step"], c["last_step"] + 1) for c in self._chunks]
        ).astype(np.int64) if self._chunks else np.zeros(0, np.int64)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Recording":
        """Open a recording directory (checks the manifest; data files are read on demand).

        Raises:
            LogError: no recording at ``path``, not a trajectory recording, a damaged manifest,
                or no complete step.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if not manifest["chunks"]:
            raise LogError(f"{path}: the recording holds no complete step")
        return cls(path, manifest, verify)

    # ---------------------------------------------------------------- raw files
    def _read(self, entry: dict, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        f = data_file(self.path, entry["file"])
        if not f.is_file():
            raise LogError(f"{f}: listed in {MANIFEST} but missing; the recording is incomplete")
        data = f.read_bytes()
        if len(data) != entry["bytes"] or (self.verify and zlib.crc32(data) & 0xFFFFFFFF != entry["crc32"]):
            raise LogError(f"{f}: truncated or corrupt (size or checksum differs from {MANIFEST})")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise LogError(f"{f}: not a readable .npz ({err})") from None
        missing = [k for k in required if k not in arrays]
        if missing:
            raise LogError(f"{f}: arrays {missing} missing; the file was not written by this format")
        return arrays

    def _chunk(self, step: int) -> tuple[dict, int]:
        for ci, c in enumerate(self._chunks):
            if c["first_step"] <= step <= c["last_step"]:
                if self._cache is None or self._cache[0] != ci:
                    self._cache = (ci, self._read(c, CHUNK_ARRAYS))
                return self._cache[1], step - c["first_step"]
        raise LogError(f"step {step} is not in the recording (steps {self.steps[0]}..{self.steps[-1]})")

    # ---------------------------------------------------------------- public reads
    @property
    def first_step(self) -> int:
        return int(self.steps[0])

    @property
    def last_step(self) -> int:
        return int(self.steps[-1])

    @property
    def bytes_per_step(self) -> float:
        """Bytes on disk (data files) per recorded step."""
        return float(self.manifest.get("bytes_per_step", float("nan")))

    @property
    def checkpoint_steps(self) -> list[int]:
        return sorted(self._ckpts)

    def missing_steps(self) -> list[tuple[int, int]]:
        """Gaps between the first and last recorded steps, as inclusive ``(first, last)`` ranges."""
        return missing_step_ranges(self.steps)

    def ids(self, step: int) -> np.ndarray:
        """Sample ids of step ``step``."""
        c, i = self._chunk(step)
        return c["ids"][c["offsets"][i] : c["offsets"][i + 1]]

    def max_id(self) -> int:
        return max(int(self._read(c, CHUNK_ARRAYS)["ids"].max()) for c in self._chunks)

    def final_theta(self) -> Tensor:
        """The parameters after the last recorded step, flat ``[P]``."""
        c, _ = self._chunk(self.last_step)
        return torch.from_numpy(c["theta_end"].copy())

    def state(self, step: int) -> StepState:
        """What was recorded about step ``step`` (tensors only with ``every=1``)."""
        c, i = self._chunk(step)
        st = StepState(
            step=step, ids=c["ids"][c["offsets"][i] : c["offsets"][i + 1]], hyper=c["hyper"][i],
            opt_step=c["opt_step"][i], had_buffer=c["had_buffer"][i], updated=c["updated"][i],
            grad_norm=float(c["grad_norm"][i]),
        )
        for key in ("theta", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in c:
                setattr(st, key, torch.from_numpy(c[key][i].copy()))
        return st

    def checkpoint(self, step: int) -> dict[str, Tensor | np.ndarray]:
        """The checkpoint before step ``step`` (``every > 1``): ``theta`` and the optimizer state."""
        if step not in self._ckpts:
            raise LogError(f"no checkpoint before step {step}; checkpoints: {self.checkpoint_steps[:10]}...")
        raw = self._read(self._ckpts[step], ("theta", "opt_step", "had_buffer"))
        return {k: (torch.from_numpy(v.copy()) if v.dtype.kind == "f" and v.ndim == 1 and k != "opt_step" else v)
                for k, v in raw.items()}

    def __repr__(self) -> str:
        return (f"Recording({str(self.path)!r}, {self.optimizer} ({self.manifest['optimizer_class']}), steps "
                f"{self.first_step}..{self.last_step}, every={self.every}, {self.n_params} parameters, "
                f"{self.bytes_per_step / 1024:.1f} KiB/step)")
