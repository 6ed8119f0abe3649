"""Writing a trajectory recording: :class:`TrajectoryRecorder`, a step listener."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.atomic import atomic_write, npz_bytes
from inrun_shapley.errors import ConfigurationError, UnsupportedOptimizerError
from inrun_shapley.optim import adapter_for, innermost_optimizer
from inrun_shapley.optim.adam import STEP
from inrun_shapley.optim.sgd import MOMENTUM_BUFFER
from inrun_shapley.optim.base import as_float
from inrun_shapley.trajectory.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HYPER_FIELDS,
    MANIFEST,
    STATE_KEYS,
    checkpoint_name,
    chunk_name,
    hyper_row,
)
from inrun_shapley.trajectory.recording import read_manifest

_ALL_STATE_KEYS = tuple(k for keys in STATE_KEYS.values() for k in keys)


def _flat(tensors, dtype) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).to("cpu", dtype) for t in tensors]).numpy()


class _Standalone:
    """What a step listener reads from the tracker (``model``, ``optimizer``), for standalone use."""

    def __init__(self, model: nn.Module, optimizer):
        self.model = model
        self.optimizer = innermost_optimizer(optimizer)


class TrajectoryRecorder:
    """Records what the adjoint pass needs, at every real optimizer step.

    Attach it to a :class:`~inrun_shapley.ShapleyTracker` with ``tracker.add_step_listener(rec)``
    (the tracker knows the sample ids of every step), or standalone with :meth:`attach` and
    :meth:`set_ids`. Call :meth:`close` (or use it as a context manager) after training.

    Args:
        path: directory of the recording (created). An existing non-empty directory needs
            ``resume`` or ``overwrite``.
        every: 1 stores ``θ_s`` and the optimizer state at every step; ``k > 1`` stores them
            every k steps and lets the adjoint pass replay the steps in between (package
            docstring: what is exact, bytes per step).
        chunk_steps: steps per chunk file (a flush every this many steps).
        optimizer_state: store what Adam's step Jacobian needs (moments, gradient); without it
            only SGD runs can be propagated.
        dtype: dtype of the stored tensors (default: the parameters' dtype, at least float32;
            on resume, the recording's).
        overwrite: delete the recording files in ``path`` and start a new recording.
        resume: continue the recording in ``path`` (a resumed training run): the first step
            seen must be the one after the recording's last, with the same parameters, param
            groups, optimizer, ``every``, ``optimizer_state`` and dtype. Without a recording there,
            a new one is started.

    Raises:
        ConfigurationError: bad arguments; ``path`` not empty and neither ``resume`` nor
            ``overwrite``; steps not consecutive; on resume, a different model/optimizer layout
            or a first step that does not follow the recording's last.
        LogError: ``resume`` on a damaged recording.
        UnsupportedOptimizerError: the optimizer is neither Adam/AdamW nor SGD (first step).

    Example:
        See the package docstring.
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
        resume: bool = False,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigurationError(f"every must be an int >= 1, got {every!r}")
        if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise ConfigurationError(f"chunk_steps must be an int >= 1, got {chunk_steps!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating dtype, got {dtype}")
        if overwrite and resume:
            raise ConfigurationError("pass overwrite=True (replace the recording) or resume=True (continue it), not both")
        self.path = Path(path)
        self._resumed: dict | None = None
        if self.path.exists() and not self.path.is_dir():
            raise ConfigurationError(f"{self.path} is a file; a recording is a directory")
        if resume and (self.path / MANIFEST).exists():
            self._resumed = read_manifest(self.path)
        elif self.path.is_dir() and any(self.path.iterdir()) and not overwrite and not resume:
            what = "already holds a recording" if (self.path / MANIFEST).exists() else "is not empty"
            raise ConfigurationError(
                f"{self.path} {what}: pass resume=True to continue it (a resumed training run), "
                "overwrite=True to replace it, or choose another path"
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
        if self._resumed is not None:
            self._check_resume_settings(self._resumed)
            self._last_step = int(self._resumed["last_step"])

    # ---------------------------------------------------------------- standalone use
    def attach(self, model: nn.Module, optimizer) -> "TrajectoryRecorder":
        """Record without a tracker: hooks on ``optimizer`` (call :meth:`set_ids` before every
        ``optimizer.step()``); steps are numbered on from the recording's last (1 when new).
        Returns self."""
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

    # ---------------------------------------------------------------- layout
    def _check_resume_settings(self, old: dict) -> None:
        wrong = []
        if old["every"] != self.every:
            wrong.append(f"every: recorded {old['every']}, now {self.every}")
        if old.get("optimizer_state", True) != bool(self.optimizer_state):
            wrong.append(f"optimizer_state: recorded {old.get('optimizer_state', True)}, now {self.optimizer_state}")
        if self._dtype is not None and str(self._dtype).replace("torch.", "") != old["dtype"]:
            wrong.append(f"dtype: recorded {old['dtype']}, now {self._dtype}")
        if wrong:
            raise ConfigurationError(f"{self.path}: cannot resume the recording with other settings ({'; '.join(wrong)})")
        self._dtype = getattr(torch, old["dtype"])

    def _setup(self, tracker, step: int) -> None:
        model, opt = tracker.model, innermost_optimizer(tracker.optimizer)
        family = adapter_for(opt).name
        if family not in STATE_KEYS:
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
        self._params, self._opt, self._groups, self._family = params, opt, groups, family
        layout = {
            "optimizer": family,
            "optimizer_class": type(opt).__name__,
            "params": [{"name": n, "shape": list(p.shape), "group": g} for n, p, g in zip(names, params, groups)],
            "n_groups": len(opt.param_groups),
        }
        if self._resumed is not None:
            self._manifest = self._continue(self._resumed, layout, step)
            return
        self._manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "run_id": uuid.uuid4().hex,
            **layout,
            "every": self.every,
            "optimizer_state": bool(self.optimizer_state),
            "dtype": str(self._dtype).replace("torch.", ""),
            "hyper_fields": list(HYPER_FIELDS),
            "first_step": step,
            "last_step": step - 1,
            "chunks": [],
            "checkpoints": [],
        }

    def _continue(self, old: dict, layout: dict, step: int) -> dict:
        """The resumed recording's manifest, after checking the run continues it."""
        diffs = [f"{k}: recorded {old[k]!r}, now {v!r}" for k, v in layout.items() if k != "params" and old[k] != v]
        if old["params"] != layout["params"]:
            was = {p["name"]: (p["shape"], p["group"]) for p in old["params"]}
            now = {p["name"]: (p["shape"], p["group"]) for p in layout["params"]}
            diffs.append("parameters (name: [shape], group) differ: "
                         f"only recorded {sorted(set(was) - set(now))[:5]}, only now {sorted(set(now) - set(was))[:5]}, "
                         f"changed {[n for n in was if n in now and was[n] != now[n]][:5]}")
        if diffs:
            raise ConfigurationError(
                f"{self.path}: the resumed run is not the recorded one ({'; '.join(diffs)}); record it elsewhere "
                "or pass overwrite=True to replace the recording"
            )
        last = int(old["last_step"])
        if step != last + 1:
            why = (f"steps {last + 1}..{step - 1} would be missing (lost since the recording's last flush?)"
                   if step > last + 1 else
                   f"the recording already holds steps up to {last} (resumed from an older checkpoint?)")
            raise ConfigurationError(
                f"{self.path}: the run resumes at step {step} but the recording ends at step {last}: {why}. "
                f"Resume training from the state after step {last}, or record this run elsewhere / overwrite=True"
            )
        return dict(old)

    # ---------------------------------------------------------------- listener
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
            "had_buffer": [state.get(p, {}).get(MOMENTUM_BUFFER) is not None for p in self._params],
        }
        first = self._manifest["first_step"]
        if self.every == 1:
            pending["theta"] = _flat(self._params, self._dtype)
        elif (step - first) % self.every == 0:
            ck = {"step": np.int64(step), "theta": _flat(self._params, self._dtype)}
            sts = [state.get(p, {}) for p in self._params]
            ck["opt_step"] = np.array([as_float(s.get(STEP, 0.0)) for s in sts])
            ck["had_buffer"] = np.array(pending["had_buffer"])
            for key in _ALL_STATE_KEYS:
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
            "hyper": np.array([hyper_row(self._family, g) for g in self._opt.param_groups], dtype=np.float64),
            "opt_step": np.array([as_float(s.get(STEP, 0.0)) for s in sts]),
            "had_buffer": np.array(pending["had_buffer"]),
            "updated": np.array([p.grad is not None for p in self._params]),
        }
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        rec["grad_norm"] = float(torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grads)))
        if self.every == 1:
            rec["theta"] = pending["theta"]
            if self._family == "adam" and self.optimizer_state:
                rec["grad"] = _flat(grads, self._dtype)
                for key in STATE_KEYS["adam"]:
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
        for key in ("theta", "grad") + STATE_KEYS["adam"]:
            if all(key in r for r in recs):
                arrays[key] = np.stack([r[key] for r in recs])
        first, last = int(arrays["step"][0]), int(arrays["step"][-1])
        entry = atomic_write(self.path / chunk_name(first), npz_bytes(arrays))
        entry.update(first_step=first, last_step=last)
        self._manifest["chunks"].append(entry)
        for step, ck in self._pending_ckpts:
            e = atomic_write(self.path / checkpoint_name(step), npz_bytes(ck))
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
