"""The value log: per-sample totals and per-step records of a run, on disk.

The step engine hands the log, once per optimizer step, the ids of the step's samples and
their values; :class:`ShapleyLogWriter` keeps running totals per sample id and persists them
crash-safely; :class:`ShapleyLog` reads a log back (no training code needed), normalizes scores
for ranking, and :func:`merge_logs` merges the per-rank logs of a distributed run.

Sign and units are declared by each log (the header's ``score`` description). In-Run Shapley
logs (the default): a value is positive when the sample's presence in the step *reduced* the
validation loss; values include the learning rate, so they are in units of validation loss
(docs/math.md §1.3). Other scores (the adjoint pass) declare their own meaning and
a ``helpful_sign`` that pruning and ranking use.

Layout of the package: :mod:`~inrun_shapley.log.fields` (declared fields, one reduction each),
:mod:`~inrun_shapley.log.accumulator` (the one per-id accumulator, sparse ids),
:mod:`~inrun_shapley.log.moments` (per-step standardization), :mod:`~inrun_shapley.log.format`
and :mod:`~inrun_shapley.log.header` (on-disk format), :mod:`~inrun_shapley.log.writer`,
:mod:`~inrun_shapley.log.reader`, :mod:`~inrun_shapley.log.merge`.

Example:
    >>> import tempfile, os, numpy as np
    >>> d = os.path.join(tempfile.mkdtemp(), "run.shapley")
    >>> with ShapleyLogWriter(d) as w:
    ...     w.add_step(1, np.array([3, 5]), np.array([0.2, -0.1]))
    ...     w.add_step(2, np.array([5, 0]), np.array([0.05, 0.01]))
    True
    True
    >>> log = ShapleyLog.load(d)
    >>> log.values.round(3).tolist(), log.counts.tolist(), log.ids.tolist()
    ([0.01, 0.0, 0.0, 0.2, 0.0, -0.05], [1, 0, 0, 1, 0, 2], [0, 3, 5])
    >>> log.score["kind"], log.helpful_sign
    ('inrun_shapley', 1)
"""

from inrun_shapley.log.accumulator import IdAccumulator
from inrun_shapley.log.format import FORMAT_VERSION
from inrun_shapley.log.merge import merge_logs
from inrun_shapley.log.moments import combine_moments, step_moments, step_scale
from inrun_shapley.log.reader import NORMALIZATIONS, RANKINGS, ShapleyLog
from inrun_shapley.log.writer import ShapleyLogWriter

__all__ = [
    "FORMAT_VERSION",
    "IdAccumulator",
    "NORMALIZATIONS",
    "RANKINGS",
    "ShapleyLog",
    "ShapleyLogWriter",
    "combine_moments",
    "merge_logs",
    "step_moments",
    "step_scale",
]
