"""The in-run engine: the tracker shell (``tracker``), its hooks and micro-batch bookkeeping
(``capture_session``), pure direction and scoring functions (``directions``, ``scoring``), the
step-hook state (``step``), the validation objective (``validation``), per-query/ghost planning
(``queries``), in-memory values (``store``)."""

from inrun_shapley.engine.directions import Estimator  # noqa: F401
from inrun_shapley.engine.tracker import ModuleReport, ShapleyTracker  # noqa: F401
from inrun_shapley.engine.validation import ValidationObjective  # noqa: F401

__all__ = ["Estimator", "ModuleReport", "ShapleyTracker", "ValidationObjective"]
