"""Recording a training run for the adjoint pass (DESIGN.md §2b): :class:`TrajectoryRecorder`
writes it, :class:`Recording` reads it back.

What is stored, per optimizer step ``s`` (parameters before the step are ``θ_s``):

* always: the step number, the sample ids of the step, the optimizer's hyperparameters per
  param group (``lr`` as used by the step, ``β1``, ``β2``, ``eps``, ``weight_decay``, decoupled
  or not, ``maximize``, ``amsgrad``, ``momentum``, ``dampening``, ``nesterov``: the columns of
  :data:`HYPER_FIELDS`), per parameter tensor the optimizer's step count after the step (Adam),
  whether a momentum buffer existed before the step (SGD) and whether the tensor had a gradient,
  and the norm of the gradient the optimizer used;
* with ``every=1`` (the default): ``θ_s``, and for Adam/AdamW what the step Jacobian ``J_s``
  needs: the gradient actually used ``g_s``, ``exp_avg`` (``m_s``) and ``exp_avg_sq`` (``v_s``;
  also ``max_exp_avg_sq`` with amsgrad) after the step. SGD needs only ``θ_s``.
* with ``every=k > 1``: ``θ_s`` and the optimizer state *before* the step (Adam moments and step
  count, SGD momentum buffer) only at every k-th step (a *checkpoint*, the first recorded step
  included); the steps in between are replayed by the adjoint pass from the checkpoint, the
  recorded batches and hyperparameters (one extra gradient per step). The replay recomputes
  each step's gradient as the reduced ``loss_fn`` on the recorded batch: it is exact up to
  float rounding when training did exactly that (no dropout, gradient clipping or loss
  scaling); a mismatch with the recorded gradient norm is detected and raised.

Cost (``P`` = number of optimized parameters, ``b`` = bytes per element, 4 in fp32, ``B`` = batch
size): per step ``8·B`` bytes of ids plus ~0.1 KB of scalars per param group, plus

=========================  =============================  ============================
optimizer                  ``every=1``                    ``every=k``
=========================  =============================  ============================
Adam/AdamW                 ``4·P·b`` (θ, g, m, v)         ``3·P·b / k`` (θ, m, v)
Adam/AdamW, amsgrad        ``5·P·b``                      ``4·P·b / k``
SGD with momentum          ``P·b`` (θ)                    ``2·P·b / k`` (θ, buffer)
SGD                        ``P·b``                        ``P·b / k``
=========================  =============================  ============================

and ``P·b`` per chunk (the parameters after the chunk's last step). Time: one device-to-host copy
of those tensors per step; files are written every ``chunk_steps`` steps.

On-disk format (``format_version`` 1), a directory holding

* ``manifest.json``: the header and the commit point: parameter names, shapes and param-group
  index, the optimizer family and class, ``every``, and every data file with its byte size and
  CRC-32. Files it does not list do not exist for readers.
* ``chunk-NNNNNN.npz``: ``chunk_steps`` consecutive steps: ``step [S]``, ``ids`` (all ids of the
  chunk, concatenated) with ``offsets [S+1]``, ``hyper [S, G, F]`` float64, ``opt_step [S, T]``,
  ``had_buffer [S, T]``, ``updated [S, T]``, ``grad_norm [S]``, ``theta_end [P]`` and, with
  ``every=1``, ``theta [S, P]`` (+ ``grad``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``).
* ``ckpt-NNNNNN.npz`` (``every > 1``): ``theta [P]`` and the state before step ``NNNNNN``.

Every file is written to a temporary name, fsynced, and moved into place; ``manifest.json`` is
rewritten last, so a crash leaves the recording as of its last complete flush.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from inrun_shapley import ShapleyTracker
    >>> from inrun_shapley.trajectory import Recording, TrajectoryRecorder
    >>> model = nn.Linear(3, 1)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1)
    >>> tracker = ShapleyTracker(model, opt, val_data=(x[:2], y[:2]), val_loss_fn=loss)
    >>> rec = TrajectoryRecorder(tempfile.mkdtemp() + "/run.traj")
    >>> tracker.add_step_listener(rec)
    >>> for s in range(3):
    ...     with tracker.batch(ids=torch.arange(4) + 4 * (s % 2)):
    ...         ((model(x[:4]) - y[:4]) ** 2).mean().backward()
    ...     opt.step(); opt.zero_grad()
    >>> rec.close()
    >>> r = Recording.load(rec.path)
    >>> r.steps.tolist(), r.ids(2).tolist()
    ([1, 2, 3], [4, 5, 6, 7])
"""

from __future__ import annotations

import io
import json
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.atomic import atomic_write, npz_bytes
from inrun_shapley.errors import ConfigurationError, LogError, UnsupportedOptimizerError
from inrun_shapley.optim import adapter_for, innermost_optimizer
from inrun_shapley.optim.base import as_float

FORMAT_NAME = "inrun-shapley-trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HYPER_FIELDS = (
    "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "maximize", "amsgrad",
    "momentum", "dampening", "nesterov",
)


# ------------------------------------------------------------------------------ file helpers




def _hyper_row(group: dict) -> list[float]:
    betas = group.get("betas", (0.0, 0.0))
    return [
        as_float(group["lr"]), as_float(betas[0]), as_float(betas[1]), as_float(group.get("eps", 0.0)),
        as_float(group.get("weight_decay", 0.0)), float(bool(group.get("decoupled_weight_decay", False))),
        float(bool(group.get("maximize", False))), float(bool(group.get("amsgrad", False))),
        as_float(group.get("momentum", 0.0)), as_float(group.get("dampening", 0.0)),
        float(bool(group.get("nesterov", False))),
    ]


def _flat(tensors, dtype) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).to("cpu", dtype) for t in tensors]).numpy()


class _Standalone:
    """What a step listener reads from the tracker (``model``, ``optimizer``), for standalone use."""

    def __init__(self, model: nn.Module, optimizer):
        self.model = model
        self.optimizer = innermost_optimizer(optimizer)


# ------------------------------------------------------------------------------ recorder
class TrajectoryRecorder:
    """Records what the adjoint pass needs, at every real optimizer step.

    Attach it to a :class:`~inrun_shapley.ShapleyTracker` with ``tracker.add_step_listener(rec)``
    (the tracker knows the sample ids of every step), or standalone with :meth:`attach` and
    :meth:`set_ids`. Call :meth:`close` (or use it as a context manager) after training.

    Args:
        path: directory of the recording (created; must not hold one unless ``overwrite``).
        every: 1 stores ``θ_s`` and the optimizer state at every step; ``k > 1`` stores them
            every k steps and lets the adjoint pass replay the steps in between (module
            docstring: what is exact, bytes per step).
        chunk_steps: steps per chunk file (a flush every this many steps).
        optimizer_state: store what Adam's step Jacobian needs (moments, gradient); without it
            only SGD runs can be propagated.
        dtype: dtype of the stored tensors (default: the parameters' dtype, at least float32).

    Raises:
        ConfigurationError: bad arguments, ``path`` holds a recording, steps not consecutive.
        UnsupportedOptimizerError: the optimizer is neither Adam/AdamW nor SGD (first step).

    Example:
        See the module docstring.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        every: int = 1,
        *,
        chunk_steps: int = 50,
        optimizer_state: bool = True,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigurationError(f"every must be an int >= 1, got {every!r}")
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise ConfigurationError(f"chunk_steps must be an int >= 1, got {chunk_steps!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating dtype, got {dtype}")
        self.path = Path(path)
        if (self.path / MANIFEST).exists() and not overwrite:
            raise ConfigurationError(
                f"{self.path} already holds a recording; pass overwrite=True or choose another path"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for f in list(self.path.glob("chunk-*.npz")) + list(self.path.glob("ckpt-*.npz")):
                f.unlink()
            (self.path / MANIFEST).unlink(missing_ok=True)
        self.every = every
        self.chunk_steps = chunk_steps
        self.optimizer_state = optimizer_state
        self._dtype = dtype
        self._params: list[Tensor] | None = None
        self._manifest: dict[str, Any] | None = None
        self._buffer: list[dict] = []
        self._pending: dict | None = None
        self._pending_ckpts: list[tuple[int, dict]] = []
        self._last_step = 0
        self._theta_end: np.ndarray | None = None
        self._closed = False
        self._standalone: _Standalone | None = None
        self._handles: list = []
        self._next_ids = None

    # ---------------------------------------------------------------- standalone use
    def attach(self, model: nn.Module, optimizer) -> "TrajectoryRecorder":
        """Record without a tracker: hooks on ``optimizer`` (call :meth:`set_ids` before every
        ``optimizer.step()``). Returns self."""
        self._standalone = _Standalone(model, optimizer)
        opt = self._standalone.optimizer
        self._handles.append(opt.register_step_pre_hook(lambda o, a, k: self.before_step(self._standalone,
                                                                                         self._last_step + 1)))
        self._handles.append(opt.register_step_post_hook(self._standalone_after))
        return self

    def set_ids(self, ids) -> None:
        """Standalone use: the sample ids of the batch(es) of the next optimizer step."""
        self._next_ids = np.asarray(ids.detach().cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64)

    def _standalone_after(self, optimizer, args, kwargs) -> None:
        if self._next_ids is None:
            raise ConfigurationError("TrajectoryRecorder: call recorder.set_ids(ids) before every optimizer.step()")
        ids, self._next_ids = self._next_ids, None
        self.after_step(self._standalone, self._last_step + 1, ids)

    def detach(self) -> None:
        """Remove the standalone hooks (the tracker route needs nothing removed)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---------------------------------------------------------------- listener
    def _setup(self, tracker, step: int) -> None:
        model, opt = tracker.model, innermost_optimizer(tracker.optimizer)
        family = adapter_for(opt).name
        if family not in ("adam", "sgd"):
            raise UnsupportedOptimizerError(
                f"the trajectory recorder supports Adam/AdamW and SGD, not {type(opt).__name__}"
            )
        group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        names, params, groups = [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) in group_of:
                names.append(name)
                params.append(p)
                groups.append(group_of[id(p)])
        if not params:
            raise ConfigurationError("none of the model's parameters is in the optimizer")
        if self._dtype is None:
            self._dtype = torch.promote_types(params[0].dtype, torch.float32)
        self._params, self._opt, self._groups = params, opt, groups
        self._manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "run_id": uuid.uuid4().hex,
            "optimizer": family,
            "optimizer_class": type(opt).__name__,
            "every": self.every,
            "optimizer_state": bool(self.optimizer_state),
            "dtype": str(self._dtype).replace("torch.", ""),
            "params": [{"name": n, "shape": list(p.shape), "group": g} for n, p, g in zip(names, params, groups)],
            "n_groups": len(opt.param_groups),
            "hyper_fields": list(HYPER_FIELDS),
            "first_step": step,
            "last_step": step - 1,
            "chunks": [],
            "checkpoints": [],
        }

    def before_step(self, tracker, step: int) -> None:
        """Step pre-hook (parameters are ``θ_step``): keeps ``θ_s`` (and a checkpoint's state)."""
        if self._closed:
            raise ConfigurationError("the recorder is closed")
        if self._params is None:
            self._setup(tracker, step)
        if step != self._last_step + 1 and self._last_step:
            raise ConfigurationError(f"recorded steps must be consecutive: step {step} after {self._last_step}")
        state = self._opt.state
        pending: dict[str, Any] = {
            "had_buffer": [state.get(p, {}).get("momentum_buffer") is not None for p in self._params],
        }
        first = self._manifest["first_step"]
        if self.every == 1:
            pending["theta"] = _flat(self._params, self._dtype)
        elif (step - first) % self.every == 0:
            ck = {"step": np.int64(step), "theta": _flat(self._params, self._dtype)}
            sts = [state.get(p, {}) for p in self._params]
            ck["opt_step"] = np.array([as_float(s.get("step", 0.0)) for s in sts])
            ck["had_buffer"] = np.array(pending["had_buffer"])
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if all(key in s and s[key] is not None for s in sts):
                    ck[key] = _flat([s[key] for s in sts], self._dtype)
            pending["checkpoint"] = ck
        self._pending = pending

    def after_step(self, tracker, step: int, ids) -> None:
        """Step post-hook: the step happened; keeps ids, hyperparameters and the new state."""
        if self._pending is None:
            raise ConfigurationError(
                f"step {step}: the recorder saw the end of a step but not its start; attach it before training"
            )
        pending, self._pending = self._pending, None
        state = self._opt.state
        sts = [state.get(p, {}) for p in self._params]
        rec: dict[str, Any] = {
            "step": step,
            "ids": np.asarray(ids, dtype=np.int64).reshape(-1),
            "hyper": np.array([_hyper_row(g) for g in self._opt.param_groups], dtype=np.float64),
            "opt_step": np.array([as_float(s.get("step", 0.0)) for s in sts]),
            "had_buffer": np.array(pending["had_buffer"]),
            "updated": np.array([p.grad is not None for p in self._params]),
        }
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        rec["grad_norm"] = float(torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grads)))
        if self.every == 1:
            rec["theta"] = pending["theta"]
            family = self._manifest["optimizer"]
            if family == "adam" and self.optimizer_state:
                rec["grad"] = _flat(grads, self._dtype)
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if all(key in s for s in sts):
                        rec[key] = _flat([s[key] for s in sts], self._dtype)
        if "checkpoint" in pending:
            ck = pending["checkpoint"]
            if not self.optimizer_state:
                ck = {k: v for k, v in ck.items() if k in ("step", "theta", "opt_step", "had_buffer")}
            self._pending_ckpts.append((step, ck))
        self._theta_end = _flat(self._params, self._dtype)
        self._buffer.append(rec)
        self._last_step = step
        if len(self._buffer) >= self.chunk_steps:
            self.flush()

    # ---------------------------------------------------------------- persistence
    def flush(self) -> None:
        """Write buffered steps (one chunk file) and the manifest (the commit point)."""
        if not self._buffer:
            return
        recs, self._buffer = self._buffer, []
        ids = [r["ids"] for r in recs]
        arrays = {
            "step": np.array([r["step"] for r in recs], dtype=np.int64),
            "ids": np.concatenate(ids),
            "offsets": np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64),
            "hyper": np.stack([r["hyper"] for r in recs]),
            "opt_step": np.stack([r["opt_step"] for r in recs]),
            "had_buffer": np.stack([r["had_buffer"] for r in recs]),
            "updated": np.stack([r["updated"] for r in recs]),
            "grad_norm": np.array([r["grad_norm"] for r in recs]),
            "theta_end": self._theta_end,
        }
        for key in ("theta", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if all(key in r for r in recs):
                arrays[key] = np.stack([r[key] for r in recs])
        first, last = int(arrays["step"][0]), int(arrays["step"][-1])
        entry = atomic_write(self.path / f"chunk-{first:09d}.npz", npz_bytes(arrays))
        entry.update(first_step=first, last_step=last)
        self._manifest["chunks"].append(entry)
        for step, ck in self._pending_ckpts:
            e = atomic_write(self.path / f"ckpt-{step:09d}.npz", npz_bytes(ck))
            e["step"] = step
            self._manifest["checkpoints"].append(e)
        self._pending_ckpts = []
        self._manifest["last_step"] = last
        total = sum(e["bytes"] for e in self._manifest["chunks"] + self._manifest["checkpoints"])
        n = last - self._manifest["first_step"] + 1
        self._manifest["bytes_total"] = total
        self._manifest["bytes_per_step"] = total / n
        atomic_write(self.path / MANIFEST, json.dumps(self._manifest, indent=1).encode())

    def close(self) -> None:
        """Flush what is buffered and remove standalone hooks. Idempotent."""
        if self._closed:
            return
        if self._manifest is not None:
            self.flush()
        self.detach()
        self._closed = True

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ reader
@dataclass
class StepState:
    """Everything about one step ``s`` the adjoint pass uses (flat ``[P]`` tensors).

    ``theta`` = ``θ_s`` (before the step); ``grad`` = the gradient used; ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` = Adam's state after the step (None for SGD);
    ``hyper [G, F]`` (:data:`HYPER_FIELDS`), ``opt_step``/``had_buffer``/``updated`` per tensor.
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


class Recording:
    """A recording written by :class:`TrajectoryRecorder`, read back (lazily, chunk by chunk).

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
        self._ckpts = {int(c["step"]): c for c in manifest["checkpoints"]}
        self._cache: tuple[int, dict] | None = None
        self.steps = np.concatenate(
            [np.arange(c["first_step"], c["last_step"] + 1) for c in self._chunks]
        ).astype(np.int64) if self._chunks else np.zeros(0, np.int64)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Recording":
        """Open a recording directory (checks the manifest; data files are read on demand).

        Raises:
            LogError: no recording at ``path``, not a trajectory recording, or empty.
        """
        path = Path(path)
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
        if manifest.get("format") != FORMAT_NAME:
            raise LogError(f"{path} is not a trajectory recording (format {manifest.get('format')!r})")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise LogError(f"{path}: format_version {manifest['format_version']} is newer than this library's")
        if not manifest.get("chunks"):
            raise LogError(f"{path}: the recording holds no complete step")
        return cls(path, manifest, verify)

    # ---------------------------------------------------------------- raw files
    def _read(self, entry: dict) -> dict[str, np.ndarray]:
        f = self.path / entry["file"]
        if not f.is_file():
            raise LogError(f"{f}: listed in {MANIFEST} but missing; the recording is incomplete")
        data = f.read_bytes()
        if len(data) != entry["bytes"] or (self.verify and zlib.crc32(data) & 0xFFFFFFFF != entry["crc32"]):
            raise LogError(f"{f}: truncated or corrupt (size or checksum differs from {MANIFEST})")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def _chunk(self, step: int) -> tuple[dict, int]:
        for ci, c in enumerate(self._chunks):
            if c["first_step"] <= step <= c["last_step"]:
                if self._cache is None or self._cache[0] != ci:
                    self._cache = (ci, self._read(c))
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
        return float(self.manifest["bytes_per_step"])

    @property
    def checkpoint_steps(self) -> list[int]:
        return sorted(self._ckpts)

    def ids(self, step: int) -> np.ndarray:
        """Sample ids of step ``step``."""
        c, i = self._chunk(step)
        return c["ids"][c["offsets"][i] : c["offsets"][i + 1]]

    def max_id(self) -> int:
        return max(int(self._read(c)["ids"].max()) for c in self._chunks)

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
        raw = self._read(self._ckpts[step])
        return {k: (torch.from_numpy(v.copy()) if v.dtype.kind == "f" and v.ndim == 1 and k != "opt_step" else v)
                for k, v in raw.items()}

    def __repr__(self) -> str:
        return (f"Recording({str(self.path)!r}, {self.optimizer} ({self.manifest['optimizer_class']}), steps "
                f"{self.first_step}..{self.last_step}, every={self.every}, {self.n_params} parameters, "
                f"{self.bytes_per_step / 1024:.1f} KiB/step)")


__all__ = ["HYPER_FIELDS", "Recording", "StepState", "TrajectoryRecorder"]
