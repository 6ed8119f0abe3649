"""The on-disk value log: per-sample In-Run Shapley totals and per-step records."""

from inrun_shapley.log._log import (  # noqa: F401
    FORMAT_VERSION,
    NORMALIZATIONS,
    ShapleyLog,
    ShapleyLogWriter,
    combine_moments,
    merge_logs,
    step_moments,
    step_scale,
)

__all__ = ['FORMAT_VERSION', 'NORMALIZATIONS', 'ShapleyLog', 'ShapleyLogWriter', 'combine_moments', 'merge_logs', 'step_moments', 'step_scale']
