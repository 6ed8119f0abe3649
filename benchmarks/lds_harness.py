"""LDS harness: one cached digits setup that every attribution method is judged on (docs/math.md §11).

What it builds (``build_setup``):

* data: ``sklearn.datasets.load_digits`` (no download), shuffled with ``seed``, the first
  ``n_train`` rows for training and the next ``n_queries`` rows as held-out queries; features
  standardized with the training rows' mean and std (zero-variance pixels left at 0);
* a recipe (:class:`Recipe`): a 64-64-10 tanh MLP (or a 64→10 logistic regression), AdamW,
  mini-batches drawn by a seeded permutation every epoch, a fixed number of epochs;
* the full-data model trained with that recipe (its ``state_dict`` and ``n_checkpoints``
  checkpoints along the run are cached), and ``n_models`` models retrained on random subsets of
  exactly ``alpha·n_train`` samples (same initialization seed and same recipe, so the only change
  is which samples are in the batches; the batch order is a seeded permutation of the subset);
* the query outputs of every retrained model: the **margin** (correct-class logit minus the
  largest other logit) and the cross-entropy **loss**, ``[n_models, n_queries]`` each.

Everything lands in ``cache_dir/<key>/`` (``arrays.npz``, ``models.pt``, ``recipe.json``), the key
being a hash of every setting, so a second call loads instead of training.

Scores convention: ``scores[i, q] > 0`` means *including training sample i raises query q's
output* (the margin unless ``output="loss"`` is asked for). :meth:`LDSSetup.evaluate` predicts
each retrained model's output as ``sum_{i in subset} scores[i, q]`` and reports the Spearman
correlation with the measured output across models, averaged over queries
(:func:`inrun_shapley.metrics.linear_datamodeling_score`).

Label noise (``build_noisy_setup``): the same data with ``flip_fraction`` of the training labels
moved to another class (seeded); no retrained models by default. :meth:`LDSSetup.flip_auc` turns
scores into a per-sample value ``v_i = sum_q scores[i, q]`` (what sample i does to all query
margins) and reports the ROC AUC of ``-v`` for the flipped samples.

Attaching an in-run method: ``setup.train_full(callback)`` re-runs the full-data training
exactly (bitwise on the same machine with the same torch thread count), calling the callback's
``on_train_start(model, optimizer)``, ``batch(step, ids)`` (a context manager around each
micro-batch's forward and backward, e.g. ``tracker.batch(ids)``), ``on_step_end(step, model,
optimizer, ids, loss)`` and ``on_train_end(model, optimizer)``. Or write the loop yourself from
``setup.recipe.make_model()``, ``setup.recipe.make_optimizer(params)`` and
``setup.recipe.batches(setup.train_ids)``: see :func:`train`.

Run ``python -m benchmarks.lds_harness [--quick]`` to build the cache and print a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import pathlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.common import cli, data, models
from inrun_shapley.metrics import linear_datamodeling_score, roc_auc, spearman

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".lds_cache"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """Everything that fixes one training run (model, optimizer, batch order, length).

    Attributes:
        model: ``"mlp"`` (64 → hidden → 10, ``activation``) or ``"logreg"`` (64 → 10).
        hidden: hidden width of the MLP.
        activation: ``"tanh"`` or ``"relu"``.
        epochs: passes over the training ids; a run on a subset does the same number of epochs
            (so fewer steps).
        batch_size: rows per step (the last batch of an epoch may be smaller).
        lr, weight_decay, betas: ``torch.optim.AdamW`` settings (constant learning rate).
        init_seed: seed of the model initialization (the same for every retrained model).
        order_seed: seed of the per-epoch permutations of the training ids.
        n_checkpoints: number of evenly spaced checkpoints kept along the full-data run.
    """

    model: str = "mlp"
    hidden: int = 64
    activation: str = "tanh"
    epochs: int = 30
    batch_size: int = 100
    lr: float = 3e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    init_seed: int = 0
    order_seed: int = 0
    n_checkpoints: int = 20

    def make_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialized model (seeded by ``init_seed`` unless ``seed`` is given); the
        global torch generator is left as it was."""
        if self.model not in ("mlp", "logreg"):
            raise ValueError(f"unknown model {self.model!r}: use 'mlp' or 'logreg'")
        hidden = (self.hidden,) if self.model == "mlp" else ()
        return models.mlp(hidden, activation=self.activation, seed=self.init_seed if seed is None else seed)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """``AdamW(params, lr, betas, weight_decay)``."""
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def batches(self, ids: Tensor, seed: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yields ``(epoch, batch_ids)``: each epoch a seeded permutation of ``ids``, in batches.

        ``ids`` are global training-row indices (int64); the returned batches are subsets of them.
        """
        g = torch.Generator().manual_seed(self.order_seed if seed is None else seed)
        ids = torch.as_tensor(ids, dtype=torch.long)
        for epoch in range(self.epochs):
            perm = ids[torch.randperm(len(ids), generator=g)]
            for b in perm.split(self.batch_size):
                yield epoch, b

    def steps(self, n_ids: int) -> int:
        """Number of optimizer steps of a run over ``n_ids`` training ids."""
        return self.epochs * -(-n_ids // self.batch_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)


QUICK_RECIPE = Recipe(hidden=16, epochs=8, batch_size=50, n_checkpoints=5)


class TrainCallback:
    """Hooks into :func:`train`; subclass and override what you need (all are no-ops here)."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def batch(self, step: int, ids: Tensor):
        """Context manager entered around the forward **and** backward of step ``step``."""
        return contextlib.nullcontext()

    def on_step_end(self, step: int, model: nn.Module, optimizer, ids: Tensor, loss: float) -> None:
        """After ``optimizer.step()``; ``step`` counts completed steps (1-based)."""

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        pass


def train(
    recipe: Recipe,
    x: Tensor,
    y: Tensor,
    ids: Tensor | None = None,
    callback: TrainCallback | Callable | None = None,
    checkpoint_steps: set[int] | frozenset[int] = frozenset(),
    order_seed: int | None = None,
    init_seed: int | None = None,
) -> tuple[nn.Module, list[dict]]:
    """The training loop of the benchmark, in full (what ``train_full`` runs)::

        model, opt = recipe.make_model(), recipe.make_optimizer(model.parameters())
        for step, (epoch, b) in enumerate(recipe.batches(ids), 1):
            opt.zero_grad(set_to_none=True)
            with callback.batch(step - 1, b):
                loss = F.cross_entropy(model(x[b]), y[b]); loss.backward()
            opt.step()

    Args:
        recipe: the recipe.
        x: ``[n_train, 64]`` float features of all training rows; y: ``[n_train]`` labels.
        ids: training-row indices to train on (default: all rows).
        callback: a :class:`TrainCallback`, or a plain function called as
            ``on_step_end(step, model, optimizer, ids, loss)``.
        checkpoint_steps: completed-step counts after which ``{"step", "lr", "state_dict"}``
            is kept (step 0 = the initialization).
        order_seed, init_seed: override the recipe's seeds (e.g. TRAK's independent models).

    Returns:
        ``(model, checkpoints)``; the model is in eval mode.
    """
    if ids is None:
        ids = torch.arange(len(x))
    if callback is None:
        callback = TrainCallback()
    elif not isinstance(callback, TrainCallback):
        fn = callback
        callback = type("_FnCallback", (TrainCallback,), {"on_step_end": lambda self, *a: fn(*a)})()
    model = recipe.make_model(init_seed)
    model.train()
    opt = recipe.make_optimizer(model.parameters())
    checkpoints = []

    def keep(step):
        if step in checkpoint_steps:
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            checkpoints.append({"step": step, "lr": float(opt.param_groups[0]["lr"]), "state_dict": sd})

    keep(0)
    callback.on_train_start(model, opt)
    step = 0
    for _epoch, b in recipe.batches(ids, order_seed):
        opt.zero_grad(set_to_none=True)
        with callback.batch(step, b):
            loss = F.cross_entropy(model(x[b]), y[b])
            loss.backward()
        opt.step()
        step += 1
        callback.on_step_end(step, model, opt, b, float(loss.detach()))
        keep(step)
    callback.on_train_end(model, opt)
    model.eval()
    return model, checkpoints


# --------------------------------------------------------------------------- outputs
def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Correct-class logit minus the largest other logit, ``[n]``."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return correct - other


def margin_fn(model: nn.Module, batch) -> Tensor:
    """``fn(model, (x, y)) -> [n]`` query margins (the LDS output)."""
    x, y = batch
    return margins(model(x), y)


def loss_fn(model: nn.Module, batch) -> Tensor:
    """``fn(model, (x, y)) -> [n]`` per-sample cross-entropy losses (the training loss)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@torch.no_grad()
def query_outputs(model: nn.Module, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    logits = model(x)
    return margins(logits, y).numpy(), F.cross_entropy(logits, y, reduction="none").numpy()


# --------------------------------------------------------------------------- data
def load_data(seed: int, n_train: int, n_queries: int):
    """``(x_train, y_train, x_query, y_query)``: the digits shuffled with ``seed``, standardized
    with the training rows' statistics in float64 (:func:`benchmarks.common.data.load_digits_splits`)."""
    if n_train + n_queries > data.N_DIGITS:
        raise ValueError(f"n_train + n_queries = {n_train + n_queries} > {data.N_DIGITS} digits")
    (x_tr, y_tr), (x_q, y_q) = data.load_digits_splits((n_train, n_queries), seed, scale="standardize_f64")
    return x_tr, y_tr, x_q, y_q


def flip_labels(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, np.ndarray]:
    """Moves ``round(fraction·n)`` seeded labels to a uniformly drawn *other* class
    (:func:`benchmarks.common.data.flip_labels` with the generator ``default_rng(seed + 7919)``)."""
    return data.flip_labels(y, fraction, seed + 7919)


# --------------------------------------------------------------------------- setup
@dataclass
class LDSResult:
    """LDS of one score matrix: mean over queries, std over queries, and the per-query values."""

    mean: float
    std: float
    per_query: np.ndarray

    def __float__(self) -> float:
        return self.mean

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


@dataclass
class LDSSetup:
    """A built (or loaded) benchmark setup. See the module docstring for the protocol.

    Attributes:
        recipe: the training recipe (model/optimizer factories, batch order, epochs).
        x_train ``[n, 64]`` float32, y_train ``[n]`` int64 (noisy labels in a noisy setup),
        x_query ``[Q, 64]``, y_query ``[Q]``; train_ids ``[n]`` = ``arange(n)``.
        y_train_clean: the labels before flipping; flipped: ``[n]`` bool (all False if clean).
        subsets: ``[M, n]`` bool masks of the retrained models; outputs: ``{"margin": [M, Q],
            "loss": [M, Q]}`` their query outputs; full_outputs: the same for the full model ``[Q]``.
        full_state: the full-data model's ``state_dict``; checkpoints: ``[{"step", "lr",
            "state_dict"}]`` along the full run (step 0 = initialization, last = final).
        config: the settings the cache key was computed from; path: the cache directory.
        timings: seconds spent training (``full``, ``subsets``) when built, else empty.
    """

    recipe: Recipe
    x_train: Tensor
    y_train: Tensor
    x_query: Tensor
    y_query: Tensor
    y_train_clean: Tensor
    flipped: np.ndarray
    subsets: np.ndarray
    outputs: dict[str, np.ndarray]
    full_outputs: dict[str, np.ndarray]
    full_state: dict[str, Tensor]
    checkpoints: list[dict]
    config: dict
    path: pathlib.Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    # ---- sizes and data
    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_queries(self) -> int:
        return len(self.x_query)

    @property
    def train_ids(self) -> Tensor:
        return torch.arange(self.n_train)

    @property
    def train_set(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @property
    def query_set(self) -> tuple[Tensor, Tensor]:
        return self.x_query, self.y_query

    # ---- models
    def model(self) -> nn.Module:
        """A new model holding the full-data weights, in eval mode."""
        m = self.recipe.make_model()
        m.load_state_dict(self.full_state)
        return m.eval()

    def checkpoint_model(self, k: int) -> nn.Module:
        m = self.recipe.make_model()
        m.load_state_dict(self.checkpoints[k]["state_dict"])
        return m.eval()

    def train_full(self, callback: TrainCallback | Callable | None = None, **kw) -> nn.Module:
        """Re-runs the full-data training exactly (see :func:`train`); returns the trained model.

        ``kw`` goes to :func:`train` (``checkpoint_steps``, ``order_seed``, ``init_seed``).
        """
        model, _ = train(self.recipe, self.x_train, self.y_train, self.train_ids, callback, **kw)
        return model

    # ---- judging
    def evaluate(self, scores, output: str = "margin") -> LDSResult:
        """LDS of ``scores [n_train, Q]`` (positive = including i raises query q's ``output``)."""
        if self.subsets.shape[0] < 2:
            raise ValueError("this setup has no retrained models (build it with n_models >= 2)")
        scores = np.asarray(scores, dtype=np.float64)
        out = self.outputs[output]
        mean = linear_datamodeling_score(scores, self.subsets, out)
        pred = self.subsets.astype(np.float64) @ scores
        per_q = np.array([spearman(pred[:, q], out[:, q]) for q in range(out.shape[1])])
        return LDSResult(mean=mean, std=float(np.nanstd(per_q)), per_query=per_q)

    def flip_auc(self, scores) -> float:
        """ROC AUC of ``-sum_q scores[i, q]`` for the flipped samples (needs a noisy setup)."""
        if not self.flipped.any():
            raise ValueError("flip_auc needs a setup with flipped labels (build_noisy_setup)")
        value = np.asarray(scores, dtype=np.float64).sum(1)
        return roc_auc(-value, self.flipped)


def _key(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_setup(
    cache_dir=DEFAULT_CACHE,
    n_models: int = 50,
    alpha: float = 0.5,
    seed: int = 0,
    model: str = "mlp",
    *,
    n_train: int = 1000,
    n_queries: int = 100,
    recipe: Recipe | None = None,
    flip_fraction: float = 0.0,
    quick: bool = False,
    rebuild: bool = False,
    verbose: bool = False,
) -> LDSSetup:
    """Builds (or loads from ``cache_dir``) the LDS setup.

    Args:
        cache_dir: where the cache lives (one sub-directory per settings hash); None: no cache.
        n_models: number of retrained subset models M (0 for none).
        alpha: subset fraction; each subset holds exactly ``round(alpha·n_train)`` samples.
        seed: data shuffle, subset draws and label flips (the recipe's seeds are separate).
        model: ``"mlp"`` or ``"logreg"`` (ignored when ``recipe`` is given).
        n_train, n_queries: split sizes.
        recipe: a custom :class:`Recipe` (default: ``Recipe(model=model)``).
        flip_fraction: fraction of training labels flipped (see :func:`flip_labels`).
        quick: smoke-test sizes: M=8, 300 training rows, 20 queries, :data:`QUICK_RECIPE`.
        rebuild: ignore an existing cache entry.
        verbose: print progress.
    """
    if quick:
        n_models, n_train, n_queries = min(n_models, 8), 300, 20
        recipe = recipe or dataclasses.replace(QUICK_RECIPE, model=model)
    recipe = recipe or Recipe(model=model)
    config = {
        "format": FORMAT_VERSION, "n_models": n_models, "alpha": alpha, "seed": seed,
        "n_train": n_train, "n_queries": n_queries, "flip_fraction": flip_fraction,
        "recipe": recipe.to_json(), "torch": torch.__version__.split("+")[0],
    }
    path = None
    if cache_dir is not None:
        path = pathlib.Path(cache_dir) / f"digits_{recipe.model}_{_key(config)}"
        if not rebuild and (path / "recipe.json").exists():
            return _load(path, config)

    x_tr, y_clean, x_q, y_q = load_data(seed, n_train, n_queries)
    if flip_fraction > 0:
        y_tr, flipped = flip_labels(y_clean, flip_fraction, seed)
    else:
        y_tr, flipped = y_clean, np.zeros(n_train, dtype=bool)

    total = recipe.steps(n_train)
    ck_steps = {int(round(k * total / recipe.n_checkpoints)) for k in range(recipe.n_checkpoints + 1)}
    t0 = time.perf_counter()
    full, checkpoints = train(recipe, x_tr, y_tr, checkpoint_steps=ck_steps)
    t_full = time.perf_counter() - t0
    fm, fl = query_outputs(full, x_q, y_q)

    rng = np.random.default_rng(seed + 1)
    k = int(round(alpha * n_train))
    subsets = np.zeros((n_models, n_train), dtype=bool)
    out_m = np.zeros((n_models, n_queries))
    out_l = np.zeros((n_models, n_queries))
    t0 = time.perf_counter()
    for m in range(n_models):
        subsets[m, rng.choice(n_train, size=k, replace=False)] = True
        ids = torch.from_numpy(np.flatnonzero(subsets[m]))
        sub_model, _ = train(recipe, x_tr, y_tr, ids, order_seed=recipe.order_seed + 1 + m)
        out_m[m], out_l[m] = query_outputs(sub_model, x_q, y_q)
        if verbose and (m + 1) % 10 == 0:
            print(f"  retrained {m + 1}/{n_models} models ({time.perf_counter() - t0:.1f} s)", flush=True)
    t_sub = time.perf_counter() - t0

    setup = LDSSetup(
        recipe=recipe, x_train=x_tr, y_train=y_tr, x_query=x_q, y_query=y_q, y_train_clean=y_clean,
        flipped=flipped, subsets=subsets, outputs={"margin": out_m, "loss": out_l},
        full_outputs={"margin": fm, "loss": fl},
        full_state={k_: v.detach().clone() for k_, v in full.state_dict().items()},
        checkpoints=checkpoints, config=config, path=path,
        timings={"full": t_full, "subsets": t_sub},
    )
    if path is not None:
        _save(setup, path)
    return setup


def build_noisy_setup(flip_fraction: float = 0.2, cache_dir=DEFAULT_CACHE, n_models: int = 0, **kw) -> LDSSetup:
    """:func:`build_setup` with ``flip_fraction`` of the training labels flipped (for flip AUC)."""
    return build_setup(cache_dir, n_models=n_models, flip_fraction=flip_fraction, **kw)


def _save(setup: LDSSetup, path: pathlib.Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    np.savez(
        path / "arrays.npz",
        x_train=setup.x_train.numpy(), y_train=setup.y_train.numpy(), x_query=setup.x_query.numpy(),
        y_query=setup.y_query.numpy(), y_train_clean=setup.y_train_clean.numpy(), flipped=setup.flipped,
        subsets=setup.subsets, outputs_margin=setup.outputs["margin"], outputs_loss=setup.outputs["loss"],
        full_margin=setup.full_outputs["margin"], full_loss=setup.full_outputs["loss"],
    )
    torch.save({"full_state": setup.full_state, "checkpoints": setup.checkpoints}, path / "models.pt")
    meta = {"config": setup.config, "timings": setup.timings}
    (path / "recipe.json").write_text(json.dumps(meta, indent=1, sort_keys=True))  # written last: marks complete


def _load(path: pathlib.Path, config: dict) -> LDSSetup:
    meta = json.loads((path / "recipe.json").read_text())
    if meta["config"] != json.loads(json.dumps(config)):
        raise RuntimeError(f"{path}: cached settings differ from the requested ones; pass rebuild=True")
    a = np.load(path / "arrays.npz")
    models = torch.load(path / "models.pt", weights_only=True)
    t = torch.from_numpy
    return LDSSetup(
        recipe=Recipe.from_json(config["recipe"]), x_train=t(a["x_train"]), y_train=t(a["y_train"]),
        x_query=t(a["x_query"]), y_query=t(a["y_query"]), y_train_clean=t(a["y_train_clean"]),
        flipped=a["flipped"], subsets=a["subsets"],
        outputs={"margin": a["outputs_margin"], "loss": a["outputs_loss"]},
        full_outputs={"margin": a["full_margin"], "loss": a["full_loss"]},
        full_state=models["full_state"], checkpoints=models["checkpoints"], config=config, path=path,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build (or load) the LDS setup and print a summary.")
    cli.add_quick(p)
    p.add_argument("--model", default="mlp", choices=["mlp", "logreg"])
    p.add_argument("--n-models", type=int, default=50)
    cli.add_seed(p)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--rebuild", action="store_true")
    cli.add_threads(p)
    args = p.parse_args(argv)
    cli.set_threads(args.threads)
    t0 = time.perf_counter()
    s = build_setup(args.cache_dir, n_models=args.n_models, seed=args.seed, model=args.model,
                    quick=args.quick, rebuild=args.rebuild, verbose=True)
    m = s.model()
    with torch.no_grad():
        acc_q = (m(s.x_query).argmax(1) == s.y_query).float().mean().item()
        acc_t = (m(s.x_train).argmax(1) == s.y_train).float().mean().item()
    print(f"{s.path}: {s.n_train} train, {s.n_queries} queries, {len(s.subsets)} retrained models, "
          f"{sum(p.numel() for p in m.parameters())} parameters, {s.recipe.steps(s.n_train)} steps; "
          f"train acc {acc_t:.3f}, query acc {acc_q:.3f}; {time.perf_counter() - t0:.1f} s "
          f"(timings {s.timings})")
    if len(s.subsets) > 1:
        o = s.outputs["margin"]
        print(f"query margins across retrained models: mean {o.mean():.2f}, mean per-query std {o.std(0).mean():.3f}")


if __name__ == "__main__":
    main()
