"""Trajectory-aware influence: the adjoint pass over a recorded run (docs/math.md §8).

The whole run is linearized around the recorded trajectory and propagated backwards from the
final model, one adjoint vector per query, all queries at once (``[Q, P]`` flat tensors).

Notation for step ``s`` (1-based, parameters ``θ_s`` before it, batch gradient ``g_s = Σ_i c_i``
with ``c_i`` sample i's contribution, scaled like the loss reduction: ``∇ℓ_i/|B|`` for a mean),
``σ = -1`` under ``maximize`` else 1, L2 decay ``λ2`` (Adam's coupled decay, SGD's decay),
decoupled decay ``λd`` (AdamW), ``g'_s = σ·g_s + λ2·θ_s`` the gradient the update consumes,
``H_s`` = Hessian of step s's batch loss at ``θ_s``, ``ρ`` the curvature damping (below).
Start: ``λθ_{T+1} = ∇f_q(θ_{T+1})``, every carry 0. Going from s = T down to the first step:

**Adam/AdamW** (``u = m̂/(sqrt(v̂)+eps)`` the update direction, ``θ_{s+1} = (1-η·λd)·θ_s - η·u``)::

    λm_s = -η·D_s ⊙ λθ_{s+1} + β1·λm_{s+1}
    λv_s = -η·(∂u/∂v_s) ⊙ λθ_{s+1} + β2·λv_{s+1}                    (jacobian="full" only)
    a_s  = (1-β1)·λm_s [+ 2(1-β2)·g'_s ⊙ λv_s]                      (= ∂f/∂g'_s)
    λθ_s = (1-η·λd)·λθ_{s+1} + ρ·σ·H_s a_s + λ2·a_s
    value[i, q] += σ·⟨a_s, c_i^s⟩

with ``D_s`` by ``jacobian``:

* ``"loo"`` (default, docs/math.md §8): ``D = J_s/(1-β1)``, ``J_s`` the diagonal leave-one-out
  Jacobian of the real step w.r.t. the gradient (``-inrun_shapley.optim.adam.update_jacobian_diag
  / (σ·η)``: the second moment's dependence on this step's gradient kept). This is the exact adjoint of the
  linear system ``δm_s = β1·δm_{s-1} + (1-β1)·δg'_s``, ``δθ_{s+1} = (1-ηλd)·δθ_s -
  η·J_s/(1-β1) ⊙ δm_s``: J's second-moment correction is applied to every perturbation of
  ``m_s``, and ``v``'s memory of earlier steps is dropped. It is an approximation of the real
  run's derivative, not the derivative of any real optimizer.
* ``"fixed_state"``: ``D = P_s/(1-β1^t)`` (the second moment frozen at its recorded values):
  exactly the derivative of the run with ``v_s`` held at the recorded trajectory.
* ``"full"``: ``D = P_s/(1-β1^t)`` and the second moment propagated as a state too,
  ``∂u/∂v = -m̂/(2·sqrt(v̂)·(sqrt(v̂)+eps)²·(1-β2^t))``: exactly the derivative of the real
  Adam run (no amsgrad).

**SGD** (momentum ``μ``, dampening ``d``, Nesterov; buffer ``b_s``)::

    λb_s = -η·(μ if nesterov else 1)·λθ_{s+1} + μ_{s+1}·λb_{s+1}   (0 without momentum)
    a_s  = -η·[nesterov]·λθ_{s+1} + k_b·λb_s                       (k_b = 1-d; 1 on a first step)
         = -η·λθ_{s+1}                                              (no momentum)
    λθ_s = λθ_{s+1} + ρ·σ·H_s a_s + λ2·a_s,   value[i, q] += σ·⟨a_s, c_i^s⟩

(plain SGD: ``λθ_s = (I - ηH_s)λθ_{s+1}``, ``value += -η⟨λθ_{s+1}, c_i⟩``, as in the design).
With ``ρ = 1`` these are exact derivatives of the final output w.r.t. a weight ``w_i`` on each
sample's loss term, at ``w = 1`` (for SGD: of the real run; for Adam: as listed above).

**Sign and units.** ``value[i, q] > 0``: up-weighting sample i in the steps that contained it
raises ``f_q`` at the end of the run; units of ``f_q`` per unit of sample weight (a first-order
estimate of removing i is ``-value[i, q]``).

**Damping** ``ρ`` scales the curvature term only. ``damping="auto"`` (default) is chosen from the
stability of the recursion, never from attribution quality: linearized, each step of the tangent
system is a heavy-ball iteration with momentum ``β`` (``β1``, or ``μ`` for SGD) on the matrix
``A_s = η_s·D'_s·H_s`` (``D'`` = ``J_s`` for Adam, the gradient coefficient for SGD), stable for
eigenvalues of A in ``[0, 2(1+β)]``. Power iteration (20 Hessian-vector products) estimates the
spectral radius ``a_s`` of ``A_s`` at 8 steps spread over the propagated window; then
``ρ = min(1, (1+β)/max_s a_s)``: the largest eigenvalue is kept at half the stability bound.
``damping=1.0`` switches it off; any float in (0, 1] fixes ρ.

Cost per step: one forward, one double-backward over the batch (batched over the Q directions by
``is_grads_batched``) giving both the Hessian-vector products and every ``⟨c_i, a_q⟩``; memory
``O(Q·P)`` (``2`` to ``3`` ``[Q, P]`` tensors), no per-sample gradient is materialized.

**Gradient clipping.** When the recorded gradient norm differs from the one ``loss_fn`` gives
on the recorded batch by more than 0.1 %, the contributions and the Hessian term are scaled by
the ratio ``κ`` (the clipping factor, held fixed as in docs/math.md §7) with a warning; replayed
recordings (``every > 1``) refuse such runs.
"""

from inrun_shapley.posthoc.adjoint.counterfactual import RemovalCheck, removal_check, replay_outputs
from inrun_shapley.posthoc.adjoint.damping import stability_damping
from inrun_shapley.posthoc.adjoint.influence import adjoint_influence
from inrun_shapley.posthoc.adjoint.stepper import JACOBIANS

__all__ = ["JACOBIANS", "RemovalCheck", "adjoint_influence", "removal_check", "replay_outputs", "stability_damping"]
