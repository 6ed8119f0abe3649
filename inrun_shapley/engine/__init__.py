"""The in-run engine: the tracker that attaches to a model and its optimizer, the validation
objective, in-memory values and per-query (ghost) planning."""

from inrun_shapley.engine.tracker import ModuleReport, ShapleyTracker  # noqa: F401
from inrun_shapley.engine.validation import ValidationObjective  # noqa: F401

__all__ = ["ModuleReport", "ShapleyTracker", "ValidationObjective"]
