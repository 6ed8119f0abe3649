"""inrun-shapley: which training samples helped or hurt your model, computed while it trains."""

from inrun_shapley.errors import (
    AttributionError,
    ConfigurationError,
    LogError,
    NonFiniteError,
    SampleIdError,
    UnsupportedModuleError,
    UnsupportedOptimizerError,
)

__version__ = "0.1.0"

__all__ = [
    "AttributionError",
    "ConfigurationError",
    "LogError",
    "NonFiniteError",
    "SampleIdError",
    "UnsupportedModuleError",
    "UnsupportedOptimizerError",
    "__version__",
]
