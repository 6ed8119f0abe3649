"""Trajectory-aware influence: the adjoint pass over a recorded run (DESIGN.md §2b)."""

from inrun_shapley.posthoc.adjoint._adjoint import (  # noqa: F401
    JACOBIANS,
    adjoint_influence,
    stability_damping,
)

__all__ = ['JACOBIANS', 'adjoint_influence', 'stability_damping']
