"""The entry point of the adjoint pass: :func:`adjoint_influence` (package docstring: the math)."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from inrun_shapley.errors import ConfigurationError, LogError, NonFiniteError
from inrun_shapley.posthoc.adjoint.counterfactual import compare, probe_removals
from inrun_shapley.posthoc.adjoint.damping import stability_damping
from inrun_shapley.posthoc.adjoint.replay import Source
from inrun_shapley.posthoc.adjoint.stepper import JACOBIANS, Stepper
from inrun_shapley.posthoc.adjoint.work import Work, cast, check_model, query_gradients
from inrun_shapley.trajectory import HYPER_FIELDS, Recording

DAMPING_CANDIDATES = (1.0, 0.7, 0.5, 0.35)
"""The damping values ``damping="replay"`` chooses among (one pass propagates all of them)."""

OUTPUT_KINDS = {"loss": -1, "score": 1, None: None}
"""``output_kind`` -> the value log's ``helpful_sign`` (+1: a higher score is more helpful)."""

def adjoint_influence(
    model: nn.Module,
    recording: Recording | str | os.PathLike,
    train_data,
    loss_fn: Callable,
    queries,
    output_fn: Callable | None = None,
    *,
    reduction: str = "mean",
    jacobian: str = "auto",
    damping: float | str = "auto",
    last_steps: int | None = None,
    n_train: int | None = None,
    dtype: torch.dtype | None = None,
    query_block: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    log_path: str | os.PathLike | None = None,
    output_kind: str | None = None,
    progress: bool = True,
    info: dict | None = None,
    probe_fraction: float = 0.05,
    probes: int = 4,
) -> np.ndarray:
    """Trajectory-aware influence of every training sample on every query (docs/math.md §8).

    Args:
        model: the trained architecture (its parameter names and shapes must match the
            recording; its weights are not used: the pass starts from the recording's final
            weights, with a warning when the model's differ). Never modified (a copy is used).
        recording: a :class:`~inrun_shapley.trajectory.Recording` or its directory.
        train_data: the training set, indexable by sample id: ``train_data[ids]``, a tuple/list
            or dict of tensors indexed row-wise, or a function ``ids -> batch``; the batch is
            handed to ``loss_fn``.
        loss_fn: ``fn(model, batch) -> [B]`` per-sample training losses; the training loss was
            their mean (``reduction="mean"``) or sum (``"sum"``). Must call the model as
            ``model(...)`` and be deterministic (no dropout).
        queries: whatever ``output_fn`` takes (by default a batch for ``loss_fn``).
        output_fn: ``fn(model, queries) -> [Q]``: the observable to attribute (margin,
            log-prob, ...). Default None: the query's utility, minus its loss
            ``-loss_fn(model, queries)``, so that, like every score of the library, positive =
            helpful (including the sample lowers the query loss).
        reduction: ``"mean"`` or ``"sum"``, how the training loss reduced the per-sample losses.
        jacobian: Adam's step Jacobian: ``"auto"`` (default: ``"full"``, the exact derivative of
            the real run, or ``"loo"`` when the run used amsgrad, which ``"full"`` does not
            support), ``"loo"``, ``"fixed_state"`` or ``"full"`` (module docstring: what each one
            is the exact derivative of). Ignored for SGD. ``"full"`` is the default because it
            scored at or above ``"loo"`` at every removed fraction of the digits benchmark
            (``benchmarks/RESULTS.md`` §16).
        damping: ``"auto"`` (the stability rule of the module docstring), ``"replay"``, or ``ρ``
            in (0, 1] (1 = none) scaling the curvature term. ``"replay"`` propagates every ρ of
            :data:`DAMPING_CANDIDATES` in the same pass (the queries repeated), replays the recorded
            run exactly without ``probes`` random sets of ``probe_fraction`` of the rows
            (:func:`~inrun_shapley.posthoc.adjoint.probe_removals`, ``probes + 1`` replays, each
            about one training run) and keeps the ρ whose first-order prediction of those removals
            has the smallest median relative error over the queries: chosen from the recording
            alone, and ``info`` then holds that error per query (the stated error estimate).
        last_steps: propagate through the last K recorded steps only (earlier steps get nothing).
        n_train: rows of the result (default: largest recorded id + 1).
        dtype: compute dtype (default: the recording's).
        query_block: queries per batched Hessian-vector product (default: all at once).
        checkpoint: file for the adjoint state; the pass resumes from it when it exists and
            belongs to the same recording and settings, and saves it every ``checkpoint_every``
            steps and at the end.
        log_path: also write the result as a per-query value log
            (:class:`~inrun_shapley.log.ShapleyLogWriter`, one entry at the last recorded step,
            ``score_kind="adjoint"``, metadata ``kind="adjoint_influence"``; note the sign
            convention above).
        output_kind: what ``output_fn`` measures, for the log's ``helpful_sign``: ``"loss"``
            (higher = worse, so a positive score means harmful: -1), ``"score"`` (a margin,
            log-probability or accuracy, higher = better: +1), or None (direction unknown: the
            log cannot be ranked by helpfulness).
        progress: show a tqdm progress bar.
        info: a dict filled with diagnostics (``rho``, ``radii``, ``steps``, ``seconds``,
            ``replay_error``, ``resumed_from``; with ``damping="replay"`` also ``damping_errors``
            {ρ: median relative error} and ``check``, the chosen ρ's
            :class:`~inrun_shapley.posthoc.adjoint.RemovalCheck`: ``error``/``scale``/``relative``
            per query at ``probe_fraction``).
        probe_fraction, probes: the removals ``damping="replay"`` measures (fraction of the
            recorded rows in (0, 1), number of random sets).

    Returns:
        ``[n_train, Q]`` float64 numpy scores; ``scores[i, q] > 0``: including sample i raises
        ``f_q`` (by default the query's utility, minus its loss: positive = helpful).

    Raises:
        LogError: no (complete) recording at ``recording``.
        ConfigurationError: the model does not match the recording; the optimizer state needed
            by Adam was not recorded; bad arguments or a checkpoint from another pass.
        NonFiniteError: the propagation produced NaN/inf (lower ``damping``).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from inrun_shapley import ShapleyTracker
        >>> from inrun_shapley.trajectory import TrajectoryRecorder
        >>> from inrun_shapley.posthoc.adjoint import adjoint_influence
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1)
        >>> tracker = ShapleyTracker(model, opt, val_data=(x[:2], y[:2]), val_loss_fn=loss)
        >>> rec = TrajectoryRecorder(tempfile.mkdtemp() + "/run.traj")
        >>> tracker.add_step_listener(rec)
        >>> for s in range(4):
        ...     ids = torch.arange(4) + 4 * (s % 2)
        ...     with tracker.batch(ids):
        ...         loss(model, (x[ids], y[ids])).mean().backward()
        ...     opt.step(); opt.zero_grad()
        >>> rec.close()
        >>> scores = adjoint_influence(model, rec.path, (x, y), loss, x[:2], lambda m, q: m(q)[:, 0],
        ...                            damping=1.0, progress=False)
        >>> scores.shape
        (8, 2)
    """
    t0 = time.perf_counter()
    if reduction not in ("mean", "sum"):
        raise ConfigurationError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if jacobian not in JACOBIANS + ("auto",):
        raise ConfigurationError(f"jacobian must be 'auto' or one of {JACOBIANS}, got {jacobian!r}")
    if not (damping in ("auto", "replay") or (isinstance(damping, (int, float)) and not isinstance(damping, bool)
                                               and 0 < damping <= 1)):
        raise ConfigurationError(f"damping must be 'auto', 'replay' or a float in (0, 1], got {damping!r}")
    if damping == "replay" and checkpoint is not None:
        raise ConfigurationError("damping='replay' cannot resume from a checkpoint; pass damping='auto' or a float")
    if damping == "replay" and not (0 < probe_fraction < 1 and isinstance(probes, int) and probes >= 1):
        raise ConfigurationError(f"probe_fraction must be in (0, 1) and probes an int >= 1, got {probe_fraction!r}, "
                                 f"{probes!r}")
    if last_steps is not None and (not isinstance(last_steps, int) or last_steps < 1):
        raise ConfigurationError(f"last_steps must be a positive int or None, got {last_steps!r}")
    if output_fn is None:  # the query's utility: minus its per-sample loss
        output_fn = lambda m, q: -loss_fn(m, q).reshape(-1)  # noqa: E731
        output_kind = "score" if output_kind is None else output_kind
    if output_kind is not None and output_kind not in ("loss", "score"):
        raise ConfigurationError(f"output_kind must be one of {list(OUTPUT_KINDS)}, got {output_kind!r}")
    if checkpoint_every < 1:
        raise ConfigurationError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
    rec = recording if isinstance(recording, Recording) else Recording.load(recording)
    check_model(model, rec)
    window_first = rec.first_step if last_steps is None else max(rec.first_step, rec.last_step - last_steps + 1)
    gaps = [(a, b) for a, b in rec.missing_steps() if b >= window_first]
    if gaps:
        listed = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in gaps[:10])
        raise LogError(
            f"{rec.path}: the recording has gaps: steps {listed}{' ...' if len(gaps) > 10 else ''} are missing; the "
            "adjoint pass needs every step between the first and the last. Record the run again, or use "
            "last_steps= to propagate only through the steps after the last gap"
        )
    if rec.optimizer == "adam" and not rec.manifest.get("optimizer_state", True):
        raise ConfigurationError(
            f"{rec.path}: Adam's optimizer state was not recorded (optimizer_state=False); the adjoint pass "
            "needs it for the step Jacobian J_s: record with TrajectoryRecorder(..., optimizer_state=True)"
        )
    if jacobian == "auto":
        hyper = rec.state(rec.first_step).hyper
        amsgrad = rec.optimizer == "adam" and bool((hyper[:, HYPER_FIELDS.index("amsgrad")] > 0).any())
        jacobian = "loo" if amsgrad else "full"
    dtype = dtype or rec.dtype
    work = Work(model, rec, dtype, loss_fn, reduction, query_block)
    stepper = Stepper(rec, work, jacobian, dtype)
    source = Source(rec, stepper, train_data, dtype)
    queries = cast(queries, dtype)

    theta_final = rec.final_theta().to(dtype)
    current = torch.cat([p.detach().reshape(-1).to(dtype) for p in
                         (dict(model.named_parameters())[n] for n in rec.names)])
    if float((current - theta_final).abs().max()) > 1e-5 * max(float(theta_final.abs().max()), 1e-12):
        warnings.warn("the model's weights differ from the recording's final weights; the pass starts from the "
                      "recording's (the model only gives the architecture)", stacklevel=2)
    lam = query_gradients(work, theta_final, output_fn, queries, query_block)
    n_q = lam.shape[0]
    n_cand = len(DAMPING_CANDIDATES) if damping == "replay" else 1
    lam = lam.repeat(n_cand, 1)
    first = rec.first_step if last_steps is None else max(rec.first_step, rec.last_step - last_steps + 1)
    last = rec.last_step
    n_rows = (rec.max_id() + 1) if n_train is None else int(n_train)
    scores = torch.zeros(n_rows, n_q * n_cand, dtype=torch.float64)
    carry: dict[str, Tensor] = {}
    fingerprint = {
        "run_id": rec.manifest["run_id"], "first": first, "last": last, "jacobian": jacobian,
        "damping": str(damping), "reduction": reduction, "Q": n_q, "P": rec.n_params, "n_rows": n_rows,
        "query_sum": float(lam.double().sum()), "query_abs": float(lam.double().abs().sum()),
    }
    position = last  # steps > position are done
    rho, radii = None, []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    resumed_from = None
    if ckpt_path is not None and ckpt_path.is_file():
        saved = torch.load(ckpt_path, weights_only=True)
        fp = saved["fingerprint"]
        same = all(
            math.isclose(fp.get(k), v, rel_tol=1e-6, abs_tol=1e-12) if isinstance(v, float) else fp.get(k) == v
            for k, v in fingerprint.items()
        )
        if not same:
            raise ConfigurationError(
                f"{ckpt_path} holds the state of a different adjoint pass (recording, settings or queries differ); "
                "delete it or pass another checkpoint path"
            )
        lam, scores = saved["lam"].to(dtype), saved["scores"]
        carry = {k: v.to(dtype) for k, v in saved["carry"].items()}
        position, rho, radii = int(saved["position"]), float(saved["rho"]), list(saved["radii"])
        resumed_from = position

    if rho is None:
        if damping == "replay":  # one ρ per repeated block of queries
            rho = torch.tensor(DAMPING_CANDIDATES, dtype=dtype).repeat_interleave(n_q)[:, None]
        elif damping == "auto":
            span = list(range(first, last + 1))
            probes = sorted({span[round(i * (len(span) - 1) / 7)] for i in range(8)}) if len(span) > 1 else span
            rho, radii = stability_damping(stepper, source, probes)
        else:
            rho = float(damping)

    def save(pos: int) -> None:
        if ckpt_path is None:
            return
        tmp = ckpt_path.with_name(f".{ckpt_path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": fingerprint, "position": pos, "lam": lam, "carry": carry, "scores": scores,
                    "rho": rho, "radii": radii}, tmp)
        os.replace(tmp, ckpt_path)

    segments = [seg for seg in source.segments(first, last) if seg[0] <= position]
    bar = tqdm(total=position - first + 1, disable=not progress, desc="adjoint pass", unit="step")
    done_since_save = 0
    for seg in reversed(segments):
        states = [st for st in source.states(seg) if first <= st.step <= position]
        for st in reversed(states):
            if not bool(np.all(st.updated)):
                missing = [rec.names[j] for j in np.flatnonzero(~st.updated)]
                raise ConfigurationError(f"step {st.step}: parameters {missing} had no gradient; the adjoint needs "
                                         "every optimized parameter to take part in every step")
            rows = source.rows(st.ids)
            lam, carry, dots = stepper.reverse(st, rows, lam, carry, rho)
            if not torch.isfinite(lam).all():
                raise NonFiniteError(
                    f"adjoint pass: non-finite adjoint at step {st.step} (damping={damping}); lower damping"
                )
            scores.index_add_(0, torch.from_numpy(st.ids.astype(np.int64)), dots.T.double())
            position = st.step - 1
            bar.update(1)
            done_since_save += 1
            if done_since_save >= checkpoint_every:
                save(position)
                done_since_save = 0
    bar.close()
    save(position)
    result = scores.numpy()
    check, errors = None, {}
    if damping == "replay":
        removed, actual, replay_error = probe_removals(
            model, rec, train_data, loss_fn, queries, output_fn, fraction=probe_fraction, probes=probes, seed=0,
            reduction=reduction, dtype=torch.float64)
        checks = [compare(result[:, k * n_q:(k + 1) * n_q], removed, actual, replay_error) for k in range(n_cand)]
        errors = {r: float(np.median(c.relative)) for r, c in zip(DAMPING_CANDIDATES, checks)}
        best = int(np.argmin([errors[r] for r in DAMPING_CANDIDATES]))
        rho, check = DAMPING_CANDIDATES[best], checks[best]
        result = np.ascontiguousarray(result[:, best * n_q:(best + 1) * n_q])
    if log_path is not None:
        from inrun_shapley.log import ShapleyLogWriter

        seen = np.unique(np.concatenate([rec.ids(s) for s in range(first, last + 1)]))
        with ShapleyLogWriter(
            log_path, n_queries=n_q, record_steps=False, flush_every=0,
            score_kind="adjoint", positive_means="including the sample raises f_q (the query output)",
            helpful_sign=OUTPUT_KINDS[output_kind],
            metadata={"kind": "adjoint_influence", "sign": "positive = including the sample raises f_q",
                      "output_kind": output_kind, "jacobian": jacobian, "rho": rho, "steps": [first, last],
                      "recording": str(rec.path)},
        ) as w:
            w.add_step(last, seen, result[seen])
    if info is not None:
        if damping == "replay":
            info.update(damping_errors=errors, check=check)
        info.update(jacobian=jacobian, rho=rho, radii=radii, steps=(first, last), seconds=time.perf_counter() - t0,
                    replay_error=source.max_replay_error, resumed_from=resumed_from,
                    bytes_per_step=rec.bytes_per_step)
    return result
