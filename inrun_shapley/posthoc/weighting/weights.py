"""Learned group weights ``w = G · softmax(θ)`` (uniform = 1 each), with JSON save and load."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.weighting.groups import ParameterGroups, check_same_names, check_unique_names, names_of

_WEIGHTS_FORMAT = "inrun-shapley/group-weights"


@dataclass
class GroupWeights:
    """Non-negative weights per parameter group, ``w = G · softmax(θ)`` (uniform = 1 each).

    Attributes:
        group_names: the ``G`` group names, in weight order.
        weights: ``[G]`` non-negative, summing to ``G``.
        aspect: optional name of what the weights were fitted for.
        objective_trace: objective value at every evaluation of the fit (empty if not fitted).
        config: the fitting options (JSON-serializable).
        fit_info: fit diagnostics (uniform objective, per-restart objectives, winner).
    """

    group_names: tuple[str, ...]
    weights: np.ndarray
    aspect: str | None = None
    objective_trace: np.ndarray = field(default_factory=lambda: np.zeros(0))
    config: dict = field(default_factory=dict)
    fit_info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.group_names = tuple(str(g) for g in self.group_names)
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        self.objective_trace = np.asarray(self.objective_trace, dtype=np.float64).reshape(-1)
        if self.weights.shape[0] != len(self.group_names):
            raise ConfigurationError(
                f"{self.weights.shape[0]} weights for {len(self.group_names)} group names"
            )
        check_unique_names(self.group_names)
        if np.any(~np.isfinite(self.weights)) or np.any(self.weights < 0):
            raise ConfigurationError(f"weights must be finite and non-negative, got {self.weights}")

    @classmethod
    def uniform(cls, group_names: Sequence[str] | ParameterGroups) -> GroupWeights:
        """All weights 1 (reproduces the unweighted score)."""
        names = names_of(group_names)
        return cls(names, np.ones(len(names)))

    def as_dict(self) -> dict[str, float]:
        """``{group: weight}``."""
        return {g: float(w) for g, w in zip(self.group_names, self.weights)}

    def aligned(self, group_names: Sequence[str] | ParameterGroups) -> np.ndarray:
        """The weights in the order of ``group_names`` (same set of names required).

        Raises:
            ConfigurationError: the names differ; lists the missing and unexpected ones.
        """
        names = list(names_of(group_names))
        check_same_names(names, self.group_names, "the target", "the weights")
        lookup = self.as_dict()
        return np.array([lookup[n] for n in names], dtype=np.float64)

    def table(self) -> str:
        """Plain-text table: group, weight, share (= weight / G, the softmax probability)."""
        G = len(self.group_names)
        width = max([5] + [len(g) for g in self.group_names])
        head = f"{'group':<{width}}  {'weight':>8}  {'share':>7}"
        lines = [f"aspect: {self.aspect}"] if self.aspect else []
        lines += [head, "-" * len(head)]
        for g, w in zip(self.group_names, self.weights):
            lines.append(f"{g:<{width}}  {w:8.4f}  {100 * w / G:6.2f}%")
        return "\n".join(lines)

    def to_json(self) -> str:
        """JSON text with the group names, weights, fit trace and options."""
        return json.dumps(
            {
                "format": _WEIGHTS_FORMAT,
                "version": 1,
                "aspect": self.aspect,
                "group_names": list(self.group_names),
                "weights": self.weights.tolist(),
                "objective_trace": self.objective_trace.tolist(),
                "config": self.config,
                "fit_info": self.fit_info,
            },
            indent=2,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(
        cls, path: str | os.PathLike, groups: Sequence[str] | ParameterGroups | None = None
    ) -> GroupWeights:
        """Read weights written by :meth:`save`.

        Args:
            path: the JSON file.
            groups: if given, the groups the weights will be applied to; the result is
                reordered to match them.

        Raises:
            ConfigurationError: not a weights file, or its group names differ from ``groups``
                (the message lists the missing and unexpected names).
        """
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != _WEIGHTS_FORMAT:
            raise ConfigurationError(f"{path} is not a group-weights file written by GroupWeights.save")
        w = cls(
            tuple(data["group_names"]), np.array(data["weights"]), data.get("aspect"),
            np.array(data.get("objective_trace", [])), data.get("config", {}),
            data.get("fit_info", {}),
        )
        if groups is not None:
            names = names_of(groups)
            w = GroupWeights(names, w.aligned(names), w.aspect, w.objective_trace, w.config, w.fit_info)
        return w


__all__ = ["GroupWeights"]
