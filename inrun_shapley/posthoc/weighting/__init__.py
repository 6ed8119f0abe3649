"""Learned parameter-group weights for gradient-based attribution (post-hoc).

Not every layer matters equally for attribution. This package splits a model's trainable
parameters into named groups ``j`` and splits a gradient-similarity score into exact per-group
parts ``C_j(i, q)``, so that

    τ(i, q; w) = Σ_j w_j · C_j(i, q),        w = G · softmax(θ)     (uniform: w_j = 1)

is the unweighted score when ``w = 1``. The weights are fitted without labels (docs/math.md §10):
for every query take the current top-k training samples and minimize

    L(θ) = −mean_q [ mean_{i ∈ topk_q} τ(i, q; w) / ‖τ(·, q; w)‖₂ ] + λ · penalty(w),

where the penalty pulls ``w`` toward uniform: ``"l2"`` is ``mean_j (w_j − 1)²`` and ``"kl"`` is
``KL(w/G ‖ uniform) = Σ_j (w_j/G) · log w_j``. The components are computed once (per-sample
gradients with ``torch.func``) and cached, so a fit takes seconds.

Conventions used throughout:

* **Shapes.** Component arrays are ``[G, n_train, n_query]``; every weighted score is
  ``[n_train, n_query]``, the same layout as per-query in-run values and as the ``scores``
  argument of :func:`inrun_shapley.metrics.linear_datamodeling_score`.
* **Sign.** Positive = training sample ``i``'s gradient is aligned with query ``q``'s gradient,
  i.e. a gradient step on ``i`` lowers ``q``'s loss (first order). To attribute an output that
  should *rise* (a margin), pass ``query_loss_fn`` returning minus that output.
* **Units.** ``C_j`` is ``Σ_c η_c · ⟨∇ℓ_q, P_c ⊙ ∇ℓ_i⟩`` restricted to group ``j``: loss²
  per parameter² times the checkpoint weights ``η_c`` (1 when none are given), i.e. the
  first-order change of the query loss per unit step on ``i``.

Learned weights are a proxy objective. Always compare the linear datamodeling score (LDS) with
uniform and learned weights before using learned ones (``benchmarks/weighting_digits.py``).

Modules:
    groups: :class:`ParameterGroups` and the group-name helpers.
    components: :class:`GroupComponents` and :func:`compute_group_components` (validation,
        fingerprint, cache); grad_dot: the per-sample-gradient dot products behind it.
    preconditioner: :func:`adam_preconditioner`.
    weights: :class:`GroupWeights` (JSON save/load).
    fit: :class:`FitConfig`, :func:`group_weight_objective`, :func:`fit_weights`,
        :func:`fit_group_weights`.
    reweigh: :func:`reweigh`, :func:`reweigh_group_values`.
    plot: :func:`plot_group_weights` (imports matplotlib when called).

Example:
    >>> import torch
    >>> from inrun_shapley.posthoc.weighting import ParameterGroups
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> ParameterGroups.per_module(model).names
    ('0', '2')
    >>> ParameterGroups.per_tensor(model).names
    ('0.weight', '0.bias', '2.weight', '2.bias')
"""

from inrun_shapley.posthoc.weighting.components import GroupComponents, compute_group_components
from inrun_shapley.posthoc.weighting.fit import FitConfig, fit_group_weights, fit_weights, group_weight_objective
from inrun_shapley.posthoc.weighting.groups import ParameterGroups
from inrun_shapley.posthoc.weighting.plot import plot_group_weights
from inrun_shapley.posthoc.weighting.preconditioner import adam_preconditioner
from inrun_shapley.posthoc.weighting.reweigh import reweigh, reweigh_group_values
from inrun_shapley.posthoc.weighting.weights import GroupWeights

__all__ = [
    "ParameterGroups",
    "GroupComponents",
    "GroupWeights",
    "FitConfig",
    "adam_preconditioner",
    "compute_group_components",
    "group_weight_objective",
    "fit_weights",
    "fit_group_weights",
    "reweigh",
    "reweigh_group_values",
    "plot_group_weights",
]
