"""Recording a training run for the adjoint pass (docs/math.md §8): :class:`TrajectoryRecorder`
writes it (``resume=True`` continues it after a restart), :class:`Recording` reads it back.

What is stored, per optimizer step ``s`` (parameters before the step are ``θ_s``):

* always: the step number, the sample ids of the step, the optimizer's hyperparameters per
  param group (``lr`` as used by the step, ``β1``, ``β2``, ``eps``, ``weight_decay``, decoupled
  or not, ``maximize``, ``amsgrad``, ``momentum``, ``dampening``, ``nesterov``: the columns of
  :data:`HYPER_FIELDS`), per parameter tensor the optimizer's step count after the step (Adam),
  whether a momentum buffer existed before the step (SGD) and whether the tensor had a gradient,
  and the norm of the gradient the optimizer used;
* with ``every=1`` (the default): ``θ_s``, and for Adam/AdamW what the step Jacobian ``J_s``
  needs: the gradient actually used ``g_s``, ``exp_avg`` (``m_s``) and ``exp_avg_sq`` (``v_s``;
  also ``max_exp_avg_sq`` with amsgrad) after the step. SGD needs only ``θ_s``.
* with ``every=k > 1``: ``θ_s`` and the optimizer state *before* the step (Adam moments and step
  count, SGD momentum buffer) only at every k-th step (a *checkpoint*, the first recorded step
  included); the steps in between are replayed by the adjoint pass from the checkpoint, the
  recorded batches and hyperparameters (one extra gradient per step). The replay recomputes
  each step's gradient as the reduced ``loss_fn`` on the recorded batch: it is exact up to
  float rounding when training did exactly that (no dropout, gradient clipping or loss
  scaling); a mismatch with the recorded gradient norm is detected and raised.

Cost (``P`` = number of optimized parameters, ``b`` = bytes per element, 4 in fp32, ``B`` = batch
size): per step ``8·B`` bytes of ids plus ~0.1 KB of scalars per param group, plus

=========================  =============================  ============================
optimizer                  ``every=1``                    ``every=k``
=========================  =============================  ============================
Adam/AdamW                 ``4·P·b`` (θ, g, m, v)         ``3·P·b / k`` (θ, m, v)
Adam/AdamW, amsgrad        ``5·P·b``                      ``4·P·b / k``
SGD with momentum          ``P·b`` (θ)                    ``2·P·b / k`` (θ, buffer)
SGD                        ``P·b``                        ``P·b / k``
=========================  =============================  ============================

and ``P·b`` per chunk (the parameters after the chunk's last step). Time: one device-to-host copy
of those tensors per step; files are written every ``chunk_steps`` steps.

On-disk format: :mod:`inrun_shapley.trajectory.format`. Every file is written to a temporary name, fsynced, and moved into place; ``manifest.json`` is
rewritten last, so a crash leaves the recording as of its last complete flush.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from inrun_shapley import ShapleyTracker
    >>> from inrun_shapley.trajectory import Recording, TrajectoryRecorder
    >>> model = nn.Linear(3, 1)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(1)
    >>> tracker = ShapleyTracker(model, opt, val_data=(x[:2], y[:2]), val_loss_fn=loss)
    >>> rec = TrajectoryRecorder(tempfile.mkdtemp() + "/run.traj")
    >>> tracker.add_step_listener(rec)
    >>> for s in range(3):
    ...     with tracker.batch(ids=torch.arange(4) + 4 * (s % 2)):
    ...         ((model(x[:4]) - y[:4]) ** 2).mean().backward()
    ...     opt.step(); opt.zero_grad()
    >>> rec.close()
    >>> r = Recording.load(rec.path)
    >>> r.steps.tolist(), r.ids(2).tolist()
    ([1, 2, 3], [4, 5, 6, 7])
"""

from inrun_shapley.trajectory.format import HYPER_FIELDS
from inrun_shapley.trajectory.recorder import TrajectoryRecorder
from inrun_shapley.trajectory.recording import Recording, StepState

__all__ = ["HYPER_FIELDS", "Recording", "StepState", "TrajectoryRecorder"]
