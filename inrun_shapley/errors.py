"""One error family for the whole library.

Every error raised on purpose by inrun-shapley is an :class:`AttributionError`; the subclasses
say which part of the input is wrong. Messages always say what was found and what to do.
"""

from __future__ import annotations


class AttributionError(Exception):
    """Base class of every error raised on purpose by inrun-shapley."""


class ConfigurationError(AttributionError, ValueError):
    """An argument or combination of arguments is invalid."""


class UnsupportedModuleError(AttributionError):
    """A module with trainable parameters has no capture rule, or couples samples (BatchNorm)."""


class UnsupportedOptimizerError(AttributionError):
    """The optimizer (or one of its options) has no adapter."""


class SampleIdError(AttributionError):
    """Sample ids are missing, duplicated, or do not match the batch."""


class NonFiniteError(AttributionError, FloatingPointError):
    """A loss, gradient or sampler state became NaN or infinite."""


class LogError(AttributionError):
    """A value log is missing, corrupt, or incompatible with the requested operation."""


class MissingExtraError(AttributionError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


__all__ = [
    "AttributionError",
    "ConfigurationError",
    "UnsupportedModuleError",
    "UnsupportedOptimizerError",
    "SampleIdError",
    "NonFiniteError",
    "LogError",
    "MissingExtraError",
]
