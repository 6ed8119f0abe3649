"""inrun-shapley: which training samples helped or hurt your model, computed while it trains.

Sign and units: a value is positive when the sample lowered the validation loss; values include
the learning rate, so they are in units of validation loss.
"""

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
from inrun_shapley.tracker import ModuleReport, ShapleyTracker
from inrun_shapley.validation import ValidationObjective

__version__ = "0.1.0"

__all__ = [
    "AttributionError",
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
