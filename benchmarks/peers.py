"""Baseline attribution methods on an :class:`~lds_harness.LDSSetup`: ``fn(setup) -> [n_train, Q]``.

Sign convention of every function here: ``scores[i, q] > 0`` means *including training sample i
raises query q's margin* (the LDS output of the harness). How each method gets there:

* gradient-based reference methods: one SGD-like step on sample i moves the weights by
  ``-lr·∇ℓ_i`` and the margin by ``-lr·⟨∇ℓ_i, ∇m_q⟩``, so the score is ``-⟨∇ℓ_i, ∇m_q⟩``
  (summed over checkpoints times the learning rate for TracIn);
* influence functions: up-weighting sample i by ``1/n`` moves the weights by
  ``-(1/n)·(H + λI)⁻¹∇ℓ_i`` (H = Hessian of the mean training loss), so the score is
  ``-∇m_qᵀ(H + λI)⁻¹∇ℓ_i`` (the ``1/n`` dropped: a constant does not change LDS);
* kronfluence and dattri's TracIn/IF compute ``∇(measurement)ᵀ·P·∇(train loss)`` with the
  measurement set to the margin: positive there means including i *lowers* the margin, so their
  scores are negated;
* TRAK (dattri, traker) is positive when including i raises the model output (the log-odds of the
  correct class, a margin), so it is taken as is.

Damping of the influence functions (chosen without looking at LDS): ``λ = 0.1 × mean eigenvalue``
of the damped matrix's curvature — the heuristic kronfluence applies when ``damping_factor=None``,
used for our exact IF (negative Hessian eigenvalues clipped to 0 first: the MLP loss is not convex)
and handed to dattri's explicit IF as its ``regularization``; kronfluence uses its own heuristic.

Peers are imported lazily: a missing or broken package raises, and ``quality.py`` records the
error text as ``failed: ...``.
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.lds_harness import LDSSetup, margins

IF_DAMPING_FACTOR = 0.1  # λ = factor × mean eigenvalue (kronfluence's heuristic)


# --------------------------------------------------------------------------- helpers
class _Flat:
    """Functional view of the setup's model over one flat parameter vector."""

    def __init__(self, setup: LDSSetup, state: dict, dtype=torch.float32):
        self.model = setup.recipe.make_model().to(dtype)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]
        self.w = torch.cat([state[n].reshape(-1) for n in self.names]).to(dtype)
        self.dtype = dtype

    def params(self, w: Tensor) -> dict:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out[n] = w[i : i + k].reshape(s)
            i += k
        return out

    def logits(self, w: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, self.params(w), (x,))

    def loss_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample ``∇ℓ_i`` ``[n, p]``."""
        def one(w, xi, yi):
            return F.cross_entropy(self.logits(w, xi[None]), yi[None])
        return vmap(grad(one), in_dims=(None, 0, 0))(self.w, x.to(self.dtype), y)

    def margin_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-query ``∇m_q`` ``[Q, p]``."""
        def one(w, xi, yi):
            return margins(self.logits(w, xi[None]), yi[None])[0]
        return vmap(grad(one), in_dims=(None, 0, 0))(self.w, x.to(self.dtype), y)

    def hessian(self, x: Tensor, y: Tensor, chunk: int = 256) -> Tensor:
        """Hessian of the mean training loss ``[p, p]``, by chunks of vmapped HVPs."""
        x = x.to(self.dtype)
        g = grad(lambda w: F.cross_entropy(self.logits(w, x), y))
        hvp = lambda v: jvp(g, (self.w,), (v,))[1]  # noqa: E731
        p = len(self.w)
        eye = torch.eye(p, dtype=self.dtype)
        rows = [vmap(hvp)(eye[i : i + chunk]) for i in range(0, p, chunk)]
        h = torch.cat(rows)
        return (h + h.T) / 2


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# --------------------------------------------------------------------------- our references
def grad_dot(setup: LDSSetup) -> np.ndarray:
    """Gradient dot product at the final model (TracIn, last checkpoint): ``-⟨∇ℓ_i, ∇m_q⟩``."""
    f = _Flat(setup, setup.full_state)
    return _np(-(f.loss_grads(*setup.train_set) @ f.margin_grads(*setup.query_set).T))


def tracin_checkpoints(setup: LDSSetup) -> np.ndarray:
    """TracIn over the run's checkpoints (all but the initialization): ``-Σ_c lr_c⟨∇ℓ_i, ∇m_q⟩``."""
    total = None
    for ck in setup.checkpoints[1:]:
        f = _Flat(setup, ck["state_dict"])
        s = -ck["lr"] * (f.loss_grads(*setup.train_set) @ f.margin_grads(*setup.query_set).T)
        total = s if total is None else total + s
    return _np(total)


def damping_heuristic(eigenvalues: Tensor) -> float:
    """``λ = IF_DAMPING_FACTOR × mean(eigenvalues)`` (eigenvalues already clipped at 0)."""
    return float(IF_DAMPING_FACTOR * eigenvalues.mean())


def exact_influence(setup: LDSSetup, info: dict | None = None) -> np.ndarray:
    """Exact damped influence function ``-∇m_qᵀ(H₊ + λI)⁻¹∇ℓ_i`` in float64.

    ``H`` is the Hessian of the mean training loss at the final weights (``torch.func`` HVPs),
    ``H₊`` the same with its negative eigenvalues set to 0, ``λ`` from :func:`damping_heuristic`.
    ``info`` (a dict) receives the damping and the eigenvalue range.
    """
    f = _Flat(setup, setup.full_state, dtype=torch.float64)
    h = f.hessian(*setup.train_set)
    evals, evecs = torch.linalg.eigh(h)
    clipped = evals.clamp_min(0)
    lam = damping_heuristic(clipped)
    gq = f.margin_grads(*setup.query_set)  # [Q, p]
    gt = f.loss_grads(*setup.train_set)  # [n, p]
    solved = evecs @ ((evecs.T @ gq.T) / (clipped + lam)[:, None])  # [p, Q]
    if info is not None:
        info.update(damping=lam, min_eig=float(evals.min()), max_eig=float(evals.max()),
                    negative_eigs=int((evals < 0).sum()))
    return _np(-(gt @ solved))


def exact_influence_ggn(setup: LDSSetup, info: dict | None = None) -> np.ndarray:
    """Exact damped influence function with the Gauss-Newton matrix instead of the Hessian.

    ``G = mean_i J_iᵀ(diag(p_i) − p_i p_iᵀ)J_i`` (J_i = ∂logits/∂w; PSD, the curvature EK-FAC
    approximates), float64, ``λ`` from :func:`damping_heuristic` on G's eigenvalues.
    """
    f = _Flat(setup, setup.full_state, dtype=torch.float64)
    x = setup.x_train.double()
    jac = vmap(torch.func.jacrev(lambda w, xi: f.logits(w, xi[None])[0]), in_dims=(None, 0))(f.w, x)  # [n, C, p]
    with torch.no_grad():
        prob = torch.softmax(f.logits(f.w, x), -1)  # [n, C]
        hj = prob[:, :, None] * jac - prob[:, :, None] * torch.einsum("nc,ncp->np", prob, jac)[:, None, :]
        g = torch.einsum("ncp,ncq->pq", jac, hj) / len(x)
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    evals = evals.clamp_min(0)
    lam = damping_heuristic(evals)
    gq = f.margin_grads(*setup.query_set)
    gt = f.loss_grads(*setup.train_set)
    solved = evecs @ ((evecs.T @ gq.T) / (evals + lam)[:, None])
    if info is not None:
        info.update(damping=lam, max_eig=float(evals.max()))
    return _np(-(gt @ solved))


# --------------------------------------------------------------------------- peers (PyPI)
def kronfluence_ekfac(setup: LDSSetup, strategy: str = "ekfac") -> np.ndarray:
    """kronfluence EK-FAC (``damping_factor=None``: its heuristic damping), margin measurement, negated."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class DigitsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).squeeze(1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return margins(model(x), y).sum()

    model = prepare_model(setup.model(), DigitsTask())
    train = TensorDataset(*setup.train_set)
    query = TensorDataset(*setup.query_set)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("lds", model, DigitsTask(), cpu=True, disable_tqdm=True,
                            disable_model_save=True, output_dir=out)
        analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=len(train),
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train,
                                         per_device_query_batch_size=len(query),
                                         per_device_train_batch_size=len(train),
                                         score_args=ScoreArguments(damping_factor=None),
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"]  # [Q, n]
    return _np(-scores.T)


def _dattri_task(setup: LDSSetup, checkpoints):
    from dattri.task import AttributionTask

    model = setup.recipe.make_model()

    # dattri calls these per sample, with or without a leading batch axis depending on the method
    def loss_func(params, data):
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x.reshape(-1, 64),)), y.reshape(-1), reduction="sum")

    def margin_func(params, data):
        x, y = data
        return margins(functional_call(model, params, (x.reshape(-1, 64),)), y.reshape(-1)).sum()

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints,
                           target_func=margin_func), model


def _loaders(setup: LDSSetup):
    train = DataLoader(TensorDataset(*setup.train_set), batch_size=250, shuffle=False)
    query = DataLoader(TensorDataset(*setup.query_set), batch_size=len(setup.x_query), shuffle=False)
    return train, query


def dattri_tracin(setup: LDSSetup) -> np.ndarray:
    """dattri ``TracInAttributor`` over the same checkpoints (weights = lr), margin target, negated."""
    from dattri.algorithm.tracin import TracInAttributor

    cks = [c["state_dict"] for c in setup.checkpoints[1:]]
    task, _ = _dattri_task(setup, cks)
    att = TracInAttributor(task=task, weight_list=torch.tensor([c["lr"] for c in setup.checkpoints[1:]]),
                           normalized_grad=False, device="cpu")
    train, query = _loaders(setup)
    return _np(-att.attribute(train, query))


def dattri_if_explicit(setup: LDSSetup) -> np.ndarray:
    """dattri ``IFAttributorExplicit`` (full Hessian), regularization = our damping heuristic, negated."""
    from dattri.algorithm.influence_function import IFAttributorExplicit

    f = _Flat(setup, setup.full_state, dtype=torch.float64)
    lam = damping_heuristic(torch.linalg.eigvalsh(f.hessian(*setup.train_set)).clamp_min(0))
    task, _ = _dattri_task(setup, setup.full_state)
    att = IFAttributorExplicit(task=task, device="cpu", regularization=lam)
    train, query = _loaders(setup)
    att.cache(train)
    return _np(-att.attribute(train, query))


def trak_models(setup: LDSSetup, n_models: int) -> list[dict]:
    """The full model plus ``n_models - 1`` full-data models with other init and order seeds."""
    states = [setup.full_state]
    for k in range(1, n_models):
        m = setup.train_full(init_seed=setup.recipe.init_seed + 1000 + k,
                             order_seed=setup.recipe.order_seed + 1000 + k)
        states.append({n: v.detach().clone() for n, v in m.state_dict().items()})
    return states


def dattri_trak(setup: LDSSetup, n_models: int = 5, proj_dim: int | None = None) -> np.ndarray:
    """dattri ``TRAKAttributor`` over ``n_models`` independently trained models (training included)."""
    from dattri.algorithm.trak import TRAKAttributor

    proj_dim = proj_dim or min(512, setup.n_train // 2)  # below n: TRAK's kernel is unregularized
    states = trak_models(setup, n_models)
    model = setup.recipe.make_model()

    def out_func(params, data):  # log-odds of the correct class
        x, y = data
        logp = -F.cross_entropy(functional_call(model, params, (x.reshape(-1, 64),)), y.reshape(-1))
        return logp - torch.log1p(-torch.exp(logp))

    def prob_func(params, data):
        x, y = data
        return torch.exp(-F.cross_entropy(functional_call(model, params, (x.reshape(-1, 64),)), y.reshape(-1)))

    from dattri.task import AttributionTask

    task = AttributionTask(loss_func=out_func, model=model, checkpoints=states)
    att = TRAKAttributor(task=task, correct_probability_func=prob_func, device="cpu",
                         projector_kwargs={"proj_dim": proj_dim, "device": "cpu"})
    train, query = _loaders(setup)
    att.cache(train)
    return _np(att.attribute(query))


def traker_trak(setup: LDSSetup, n_models: int = 5, proj_dim: int | None = None) -> np.ndarray:
    """MadryLab ``trak`` (``traker``) on CPU with its ``BasicProjector``, ``n_models`` models."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    proj_dim = proj_dim or min(512, setup.n_train // 2)  # below n: TRAK's kernel is unregularized
    states = trak_models(setup, n_models)
    model = setup.model()
    n_params = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=0,
                               proj_type=ProjectionType.rademacher, device="cpu")
    with tempfile.TemporaryDirectory() as out:
        traker = TRAKer(model=model, task="image_classification", train_set_size=setup.n_train,
                        save_dir=out, device="cpu", projector=projector, proj_dim=proj_dim)
        for mid, st in enumerate(states):
            traker.load_checkpoint(st, model_id=mid)
            for b in torch.arange(setup.n_train).split(250):
                traker.featurize(batch=(setup.x_train[b], setup.y_train[b]), num_samples=len(b))
        traker.finalize_features()
        for mid, st in enumerate(states):
            traker.start_scoring_checkpoint("q", st, model_id=mid, num_targets=setup.n_queries)
            traker.score(batch=(setup.x_query, setup.y_query), num_samples=setup.n_queries)
        scores = traker.finalize_scores(exp_name="q")
    return np.asarray(scores, dtype=np.float64)


__all__ = [
    "grad_dot", "tracin_checkpoints", "exact_influence", "exact_influence_ggn", "damping_heuristic", "kronfluence_ekfac",
    "dattri_tracin", "dattri_if_explicit", "dattri_trak", "traker_trak", "trak_models",
]
