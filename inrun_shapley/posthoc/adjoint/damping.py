"""The default curvature damping of the adjoint pass, from the stability of the recursion
(package docstring), never from attribution quality."""

from __future__ import annotations

import math

import torch

from inrun_shapley.posthoc.adjoint.replay import Source
from inrun_shapley.posthoc.adjoint.stepper import Stepper


def stability_damping(stepper: Stepper, source: Source, steps: list[int], iters: int = 20,
                      seed: int = 0) -> tuple[float, list[float]]:
    """The default damping (module docstring): ``ρ = min(1, (1+β)/max_s a_s)`` from power iteration
    on ``A_s = η_s·D'_s·H_s`` at ``steps``. Returns ``(ρ, [a_s])``."""
    gen = torch.Generator().manual_seed(seed)
    radii, beta = [], 0.0
    wanted = set(steps)
    for seg in source.segments(min(steps), max(steps)):
        if not wanted & set(range(seg[0], seg[1] + 1)):
            continue
        for st in source.states((seg[0], min(seg[1], max(steps)))):
            if st.step not in wanted:
                continue
            diag, b = stepper.stability_matrix_diag(st)
            beta = max(beta, b)
            rows = source.rows(st.ids)
            x = torch.randn(1, stepper.rec.n_params, generator=gen, dtype=stepper.dtype)
            x = x / x.norm()
            radius = 0.0
            for _ in range(iters):
                _, hx, _ = stepper.work.terms(st.theta.to(stepper.dtype), rows, x)
                y = diag * hx
                radius = float(y.norm())
                if radius == 0 or not math.isfinite(radius):
                    break
                x = y / radius
            radii.append(radius)
    top = max(radii) if radii else 0.0
    rho = 1.0 if top <= 0 or not math.isfinite(top) else min(1.0, (1.0 + beta) / top)
    return rho, radii
