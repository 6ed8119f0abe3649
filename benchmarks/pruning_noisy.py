"""Pruning a training set with 20% flipped labels: which ranking of the data retrains best?

Two datasets that ship with scikit-learn (nothing is downloaded):

* ``digits``: the demo's setting (:mod:`inrun_shapley.app.demo`): 1,000 training images with 20%
  flipped labels, 400 clean validation rows (the values' objective), the rest (397) as clean
  test set; MLP 64-128-128-10, AdamW lr 2e-3, 12 epochs of batch 32.
* ``synthetic``: ``make_classification`` (20 features, 10 informative, 5 classes, 2 clusters per
  class), standardized; 1,000 training rows with 20% flipped labels, 400 validation, 1,000 test;
  the same MLP recipe (20-128-128-5).

One tracked training run per seed records, side by side: per-step in-run values for each
estimator (``--estimators``; per-step records kept, so any per-step normalization or step range
can be read), the model after every epoch (TracIn), the per-sample loss and error-vector norm
after ``--early-epochs`` epochs (EL2N-style) and the final per-sample loss. Each ranking then
drops its lowest-valued 10/20/30/50% and the MLP is retrained from scratch on the rest (same
seed and recipe); reported: clean test accuracy.

Rankings (higher = keep):

* ``random``; ``final loss`` (−loss at the end of the tracked run; ``final loss:bal`` drops the
  same share of every class); ``EL2N`` (−‖softmax − onehot‖
  after ``--early-epochs`` epochs); ``early loss`` (−loss then); ``TracIn`` (Σ over epoch
  checkpoints of lr·⟨∇ℓ_i, ∇L_val⟩, per-sample gradients by ``torch.func``);
* in-run recipes, ``EST:RECIPE`` for each tracked estimator, RECIPE one of :data:`RECIPES`:
  ``std`` (per-step standardized sum: the library's default score), ``raw`` (raw sum), ``z``
  (per-step z-scores), ``late`` (per-step standardized, last half of the epochs only), ``bal``
  (``std`` dropping the same share of every class), ``std+loss`` (mean of the ``std`` and
  ``final loss`` rank percentiles), ``late+loss``.

Seeds: ``--seeds`` (default 0–4) are reported; ``--choose-seeds`` (default 5 6) are the only
seeds on which a recipe is chosen (``--choose``: prints the mean accuracy of every ranking at 30%
on them). Run the two separately; a recipe chosen on the reported seeds would be tuning on the
test.

Run:  python -m benchmarks.pruning_noisy --choose              # seeds 5 6: choose a recipe
      python -m benchmarks.pruning_noisy                       # seeds 0-4: report
      python -m benchmarks.pruning_noisy --quick               # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from benchmarks.common import cli
from inrun_shapley import ShapleyTracker
from inrun_shapley.app.demo import digits_with_flips
from inrun_shapley.app.digits import mlp
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.log.moments import normalized_record_sums

RECIPES = ("std", "raw", "z", "late", "bal", "std+loss", "late+loss")
FRACTIONS = (0.1, 0.2, 0.3, 0.5)


@dataclass
class Task:
    """One dataset with flipped labels and its training recipe."""

    name: str
    train: tuple  # (x [n, d] float32, noisy y [n] int64)
    val: tuple
    test: tuple
    flipped: np.ndarray  # [n] bool
    n_classes: int
    epochs: int = 12
    batch: int = 32
    lr: float = 2e-3
    hidden: int = 128

    def model(self, seed: int) -> torch.nn.Module:
        return mlp((self.hidden, self.hidden), d_in=self.train[0].shape[1], n_out=self.n_classes, seed=seed)


def synthetic_task(seed: int, flip: float = 0.2, n_train: int = 1000, n_val: int = 400, n_test: int = 1000) -> Task:
    """``make_classification`` with 5 classes, standardized on the training split, 20% flipped labels."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_train + n_val + n_test, n_features=20, n_informative=10, n_redundant=4,
                               n_classes=5, n_clusters_per_class=2, class_sep=1.0, random_state=seed)
    rng = np.random.default_rng(seed)
    x = x.astype(np.float32)
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    flipped = np.zeros(n_train, dtype=bool)
    flipped[rng.choice(n_train, size=int(round(flip * n_train)), replace=False)] = True
    y_noisy = y.copy()
    y_noisy[:n_train][flipped] = (y[:n_train][flipped] + rng.integers(1, 5, size=int(flipped.sum()))) % 5
    t = lambda a, b: (torch.from_numpy(x[a:b]), torch.from_numpy(y_noisy[a:b]).long())  # noqa: E731
    return Task("synthetic", t(0, n_train), t(n_train, n_train + n_val), t(n_train + n_val, None), flipped, 5)


def digits_task(seed: int) -> Task:
    train, val, test, flipped = digits_with_flips(seed, 0.2, 1000, 400, "standardize")
    return Task("digits", train, val, test, flipped, 10)


TASKS = {"digits": digits_task, "synthetic": synthetic_task}


def train_model(task: Task, keep: np.ndarray, seed: int, epochs: int | None = None) -> torch.nn.Module:
    """The retraining recipe (as the demo's ``train_plain``): the same MLP, AdamW, epochs, batch order seed."""
    model = task.model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    x, y = task.train[0][keep], task.train[1][keep]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs or task.epochs):
        for idx in torch.randperm(len(x), generator=g).split(task.batch):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    return float((model(data[0]).argmax(1) == data[1]).float().mean())


def tracin_val(model, checkpoints, lr: float, train, val) -> np.ndarray:
    """``[n]`` Σ_c lr·⟨∇ℓ_i(θ_c), ∇L_val(θ_c)⟩ (positive = the row's gradient lowers the validation loss)."""

    def loss_one(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    out = np.zeros(len(train[0]))
    for state in checkpoints:
        params = {k: v.detach() for k, v in state.items()}
        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, *train)
        gv = grad(lambda p: F.cross_entropy(functional_call(model, p, (val[0],)), val[1]))(params)
        out += lr * sum((per[k].reshape(len(train[0]), -1) @ gv[k].reshape(-1)).numpy() for k in params)
    return out


def tracked_run(task: Task, seed: int, estimators, early_epochs: int, work: Path) -> dict:
    """The run the rankings come from: value logs per estimator, checkpoints, early and final losses."""
    model = task.model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    val_loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    trackers = {}
    for est in estimators:
        writer = ShapleyLogWriter(work / f"{task.name}_{seed}_{est}", record_steps=True)
        trackers[est] = (ShapleyTracker(model, opt, val_data=task.val, val_loss_fn=val_loss, estimator=est,
                                        record_steps=False, sink=writer), writer)
    x, y = task.train
    g = torch.Generator().manual_seed(seed)
    checkpoints, out, steps_per_epoch = [], {}, 0
    for epoch in range(task.epochs):
        batches = torch.randperm(len(x), generator=g).split(task.batch)
        steps_per_epoch = len(batches)
        for idx in batches:
            for tr, _ in trackers.values():
                tr.begin_batch(idx)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            for tr, _ in trackers.values():
                tr.after_backward()
                tr.end_batch()
            opt.step()
            opt.zero_grad()
        checkpoints.append({k: v.detach().clone() for k, v in model.named_parameters()})
        if epoch + 1 == early_epochs:
            with torch.no_grad():
                logits = model(x)
                out["early_loss"] = F.cross_entropy(logits, y, reduction="none").numpy()
                out["el2n"] = (logits.softmax(1) - F.one_hot(y, task.n_classes)).norm(dim=1).numpy()
    for tr, w in trackers.values():
        tr.detach()
        w.close()
    with torch.no_grad():
        out["final_loss"] = F.cross_entropy(model(x), y, reduction="none").numpy()
    out["logs"] = {est: ShapleyLog.load(work / f"{task.name}_{seed}_{est}") for est in estimators}
    out["tracin"] = tracin_val(model, checkpoints, task.lr, task.train, task.val)
    out["steps_per_epoch"] = steps_per_epoch
    return out


def percentile(score: np.ndarray) -> np.ndarray:
    """Rank percentile in [0, 1] (higher score = higher percentile)."""
    return np.argsort(np.argsort(score, kind="stable"), kind="stable") / max(len(score) - 1, 1)


def inrun_score(log: ShapleyLog, recipe: str, n: int, late_from: int, final_loss: np.ndarray) -> np.ndarray:
    """``[n]`` helpfulness of one in-run recipe (see the module docstring)."""
    if recipe in ("std", "bal"):
        return log.helpfulness("step_std", ids=np.arange(n))
    if recipe == "raw":
        return log.helpfulness("none", ids=np.arange(n))
    if recipe == "z":
        return log.helpfulness("step_z", ids=np.arange(n))
    if recipe.startswith("late"):
        rec = log.steps[log.steps["step"] >= late_from]
        ids, sums = normalized_record_sums(rec, log.step_stats, "step_std")
        score = np.zeros(n)
        score[ids] = sums
        if recipe == "late":
            return score
        return percentile(score) + percentile(-final_loss)
    if recipe == "std+loss":
        return percentile(log.helpfulness("step_std", ids=np.arange(n))) + percentile(-final_loss)
    raise ValueError(f"unknown recipe {recipe!r}; one of {RECIPES}")


def keep_lowest_dropped(score: np.ndarray, frac: float, labels: np.ndarray | None = None) -> np.ndarray:
    """Ids kept after dropping the ``frac`` lowest scores (per class when ``labels`` is given)."""
    n = len(score)
    if labels is None:
        order = np.lexsort((np.arange(n), score))
        return np.sort(order[int(round(frac * n)):])
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.lexsort((members, score[members]))]
        keep.append(order[int(round(frac * len(members))):])
    return np.sort(np.concatenate(keep))


def run_seed(task: Task, seed: int, args, work: Path) -> dict:
    n = len(task.train[0])
    run = tracked_run(task, seed, args.estimators, args.early_epochs, work)
    late_from = (task.epochs // 2) * run["steps_per_epoch"] + 1
    scores = {
        "random": np.random.default_rng(seed + 1000).permutation(n).astype(float),
        "final loss": -run["final_loss"], "final loss:bal": -run["final_loss"], "early loss": -run["early_loss"],
        "EL2N": -run["el2n"],
        "TracIn": run["tracin"],
    }
    for est, log in run["logs"].items():
        for recipe in args.recipes:
            scores[f"{est}:{recipe}"] = inrun_score(log, recipe, n, late_from, run["final_loss"])
    labels = task.train[1].numpy()
    acc = {"full noisy set": accuracy(train_model(task, np.arange(n), seed), task.test)}
    flip_share = {}
    for name, score in scores.items():
        for frac in args.fractions:
            keep = keep_lowest_dropped(score, frac, labels if name.endswith(":bal") else None)
            acc[f"{name}@{frac:g}"] = accuracy(train_model(task, keep, seed), task.test)
            flip_share[f"{name}@{frac:g}"] = float(task.flipped[np.setdiff1d(np.arange(n), keep)].mean())
    return {"acc": acc, "flip_share": flip_share, "names": list(scores)}


def fmt(xs) -> str:
    xs = np.asarray(xs, dtype=float)
    return f"{xs.mean():.3f} ± {xs.std():.3f}" if len(xs) > 1 else f"{xs.mean():.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--estimators", nargs="+", default=["midpoint", "shapley"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    ap.add_argument("--early-epochs", type=int, default=2, help="epochs before the EL2N / early-loss scores")
    cli.add_seeds(ap, (0, 1, 2, 3, 4))
    ap.add_argument("--choose", action="store_true",
                    help="run the recipe-choosing seeds (--choose-seeds) instead of the reported ones")
    ap.add_argument("--choose-seeds", type=int, nargs="+", default=[5, 6])
    cli.add_threads(ap)
    cli.add_quick(ap)
    args = ap.parse_args(argv)
    seeds = args.choose_seeds if args.choose else args.seeds
    if args.quick:
        seeds, args.fractions, args.recipes = seeds[:1], [0.3], args.recipes[:2]
    cli.set_threads(args.threads)
    print("command: " + cli.command_line("pruning_noisy", argv))
    print(f"seeds {' '.join(map(str, seeds))} ({'recipe-choosing seeds' if args.choose else 'reported seeds'})")
    start = time.perf_counter()
    at30: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets:
            runs = []
            for seed in seeds:
                task = TASKS[ds](seed)
                if args.quick:
                    task.epochs = 2
                runs.append(run_seed(task, seed, args, Path(tmp)))
            names = runs[0]["names"]
            print(f"\n[{ds}] 1,000 training rows, 20% flipped labels; test accuracy after retraining "
                  f"(mean ± std over seeds; flipped share of the dropped rows in brackets)")
            print(f"  full noisy set: {fmt([r['acc']['full noisy set'] for r in runs])}")
            head = "".join(f"{f'drop {f:.0%}':>24}" for f in args.fractions)
            print(f"  {'ranking':<20}{head}")
            for name in names:
                cells = []
                for f in args.fractions:
                    key = f"{name}@{f:g}"
                    cells.append(f"{fmt([r['acc'][key] for r in runs])} [{np.mean([r['flip_share'][key] for r in runs]):.2f}]")
                    if f == 0.3:
                        at30.setdefault(name, []).append(float(np.mean([r["acc"][key] for r in runs])))
                print(f"  {name:<20}" + "".join(f"{c:>24}" for c in cells))
    if at30:
        print("\nmean test accuracy at 30% over the datasets (the choosing criterion with --choose):")
        for name, vals in sorted(at30.items(), key=lambda kv: -np.mean(kv[1])):
            print(f"  {name:<20} {np.mean(vals):.4f}   ({', '.join(f'{v:.3f}' for v in vals)})")
    print(f"\n{time.perf_counter() - start:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
