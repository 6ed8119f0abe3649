"""Recording a training run for the adjoint pass (DESIGN.md §2b): :class:`TrajectoryRecorder`
writes it, :class:`Recording` reads it back."""

from inrun_shapley.trajectory._trajectory import (  # noqa: F401
    HYPER_FIELDS,
    Recording,
    StepState,
    TrajectoryRecorder,
)

__all__ = ['HYPER_FIELDS', 'Recording', 'StepState', 'TrajectoryRecorder']
