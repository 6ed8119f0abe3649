"""Capture rules: one small unit per layer kind, registered in one table (see ``registry``)."""

from inrun_shapley.capture import conv, embedding, linear, norm, recurrent  # noqa: F401  (registers rules)
from inrun_shapley.capture.jvp import JVP_RULE, JVPRule
from inrun_shapley.capture.registry import (
    Capture,
    CaptureRule,
    project,
    register_rule,
    registered_types,
    rule_for,
)

__all__ = [
    "Capture",
    "CaptureRule",
    "JVPRule",
    "JVP_RULE",
    "project",
    "register_rule",
    "registered_types",
    "rule_for",
]
