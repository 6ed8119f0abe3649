"""What a :class:`~inrun_shapley.engine.tracker.ShapleyTracker` hands back: run values, counts,
per-module values, sparse totals, per-step records, the module report and the resumable state.

Sign and units as everywhere: positive = the sample's presence lowered the validation loss
(helpful); values include the learning rate, in units of validation loss.
"""

from __future__ import annotations

import numpy as np

from inrun_shapley.engine.tracked import ModuleReport
from inrun_shapley.errors import ConfigurationError

__all__ = ["TrackerResults"]


class TrackerResults:
    """Read-out of a tracker's in-memory store (``self.store``), its tracked modules
    (``self._modules``) and module report (``self._reports``); mixed into ``ShapleyTracker``."""

    @property
    def values(self) -> np.ndarray:
        """``[max_id + 1]`` run values (sum over steps); 0 for ids never seen."""
        return self.store.values

    @property
    def counts(self) -> np.ndarray:
        """``[max_id + 1]`` number of times each id was trained on: steps it took part in,
        counting each occurrence when a batch drew it more than once (sampling with
        replacement)."""
        return self.store.counts

    @property
    def group_values(self) -> np.ndarray | None:
        """``[max_id + 1, G]`` values split per tracked module (``group_names``), or None."""
        return self.store.group_values

    @property
    def group_names(self) -> list[str]:
        """Names of the groups of :attr:`group_values` (tracked modules, qualified names)."""
        return list(self._modules)

    def totals(self) -> dict[str, np.ndarray]:
        """Sparse totals, for any id space (hashes, global row numbers): ``ids`` ``[n_seen]``
        sorted and, aligned to them, ``value_sum`` (``[n_seen]`` or ``[n_seen, Q]``), ``count``
        and with groups ``group_sum`` ``[n_seen, G]``; copies."""
        return self.store.totals()

    def step_values(self) -> dict[str, np.ndarray]:
        """Every per-step record kept in memory, as one dict of flat, aligned arrays.

        Returns:
            ``{"step": [r] int64, "id": [r] int64, "value": [r] or [r, Q] float64}``, one row per
            (step, sample) pair, in step order.

        Raises:
            ConfigurationError: per-step records are off (``record_steps=False``, the default).
        """
        if not self.store.record_steps:
            raise ConfigurationError(
                "per-step records are off (record_steps=False, the default, keeps per-id totals only): "
                "pass ShapleyTracker(..., record_steps=True) to keep them in memory, or write a value log "
                "(sink=ShapleyLogWriter(path) or log_dir=...) and read ShapleyLog.load(path).steps"
            )
        return self.store.step_table()

    def report(self) -> list[ModuleReport]:
        """How each module with trainable parameters is handled (tracked, excluded, unsupported)."""
        return list(self._reports)

    def state_dict(self) -> dict:
        """Small resumable state: the step counter and the in-memory values."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "values": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.store.load_state_dict(state["values"])
