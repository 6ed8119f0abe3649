"""inrun-shapley: which training samples helped or hurt your model, computed while it trains.

Sign and units: a value is positive when the sample lowered the validation loss; values include
the learning rate, so they are in units of validation loss.
"""

from inrun_shapley.adjoint import adjoint_influence
from inrun_shapley.bif import BIFConfig, BIFResult, bayesian_influence
from inrun_shapley.data import IndexedDataset
from inrun_shapley.errors import (
    AttributionError,
    ConfigurationError,
    LogError,
    NonFiniteError,
    SampleIdError,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
)
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.prune import prune, subset
from inrun_shapley.tracker import ModuleReport, ShapleyTracker
from inrun_shapley.trajectory import Recording, TrajectoryRecorder
from inrun_shapley.validation import ValidationObjective

__version__ = "0.1.0"

__all__ = [
    "AttributionError",
    "BIFConfig",
    "BIFResult",
    "Recording",
    "ShapleyLog",
    "ShapleyLogWriter",
    "TrajectoryRecorder",
    "adjoint_influence",
    "bayesian_influence",
    "prune",
    "subset",
    "ConfigurationError",
    "IndexedDataset",
    "LogError",
    "ModuleReport",
    "NonFiniteError",
    "SampleIdError",
    "ShapleyTracker",
    "UnsupportedModuleError",
    "UnsupportedOptimizerError",
    "ValidationObjective",
    "__version__",
]
