"""Fidelity of every estimator against the exact Shapley values of the real optimizer step.

For one optimizer step from state (θ_t, optimizer state), the utility of a subset S of the batch
is the validation-loss decrease of the step the *real* optimizer would take if only S's
contributions were in the gradient (with Adam the second moment then depends on S too). Exact
Shapley values come from enumerating all 2^8 subsets (batch 8), or, at batch 32, from permutation
Monte Carlo (two independent estimates whose agreement is printed). Each estimator's per-step
values are read from a :class:`~inrun_shapley.ShapleyTracker` attached to the same run and
compared by Pearson correlation (and the largest error relative to the largest exact value).

Three tables, each row a setting (model × optimizer × learning rate), over several seeds:

* ``spread``: batch 8, checked at steps ``--at`` (after ≥ 20 warm-up steps by default);
* ``early``: batch 8, Adam/AdamW, checked at steps 1..10;
* ``batch32``: batch 32 against permutation Monte Carlo.

Also checks the fast path against a brute-force implementation of the midpoint rule
(per-sample gradients, autograd through the real update at G/2): ``midpoint_bf`` in the tables.

Run (about 3 minutes on 2 CPU cores)::

    python -m benchmarks.fidelity --seeds 0 1
    python -m benchmarks.fidelity --quick          # one seed, fewer settings (CI smoke)
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from inrun_shapley import ShapleyTracker
from inrun_shapley.metrics import pearson
from tests import oracles

# (estimator, order) pairs compared; the names are the tracker's estimator names.
ESTIMATORS = [("midpoint", 1), ("shapley", 1), ("shapley", 2), ("loo", 1), ("sgd", 1)]


# ------------------------------------------------------------------ models and data
class TokenBag(nn.Module):
    """Embedding → mean over positions → LayerNorm → Linear: an Embedding model for the spread."""

    def __init__(self, vocab: int = 24, dim: int = 12, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(torch.tanh(self.norm(self.emb(tokens).mean(1))))


class SmallConv(nn.Module):
    """Conv2d on 6×6 single-channel images → GELU → Linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.head(F.gelu(self.conv(x)).flatten(1))


def make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    if kind == "mlp_ln":
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    if kind == "mlp_relu":
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    if kind == "conv":
        return SmallConv()
    if kind == "embed":
        return TokenBag()
    raise ValueError(kind)


def make_data(kind: str, seed: int, n: int = 256, n_val: int = 32):
    """A learnable 3-class task with label noise, in the model's input format (fp64)."""
    g = torch.Generator().manual_seed(1000 + seed)
    if kind == "embed":
        x = torch.randint(0, 24, (n + n_val, 5), generator=g)
        w = torch.randn(24, 3, generator=g, dtype=torch.float64)
        score = w[x].sum(1)
    else:
        d = 36 if kind == "conv" else 6
        x = torch.randn(n + n_val, d, generator=g, dtype=torch.float64)
        w = torch.randn(d, 3, generator=g, dtype=torch.float64)
        score = x @ w
        if kind == "conv":
            x = x.view(-1, 1, 6, 6)
    y = (score + 0.5 * torch.randn(score.shape, generator=g, dtype=torch.float64)).argmax(1)
    return (x[:n], y[:n]), (x[n:], y[n:])


OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.05),
    "sgdm": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
}
LRS = {"adam": (1e-2, 4e-2), "adamw": (1e-2, 4e-2), "sgdm": (0.1, 0.4)}


@dataclass
class Setting:
    model: str
    optimizer: str
    lr: float

    @property
    def name(self) -> str:
        return f"{self.model}/{self.optimizer}/{self.lr:g}"


def _val_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


# ------------------------------------------------------------------ brute force
def _utility_fn(model, theta, snap, kind, contrib, val):
    """``U(subset) = L_val(θ_t) − L_val(θ_next(subset))`` under the real optimizer step."""
    before = _val_loss(lambda a: functional_call(model, theta, (a,)), val).mean()

    def loss_after(g_s):
        nxt = oracles.make_step(kind, snap, theta, g_s, frozen=False)(g_s)
        return _val_loss(lambda a: functional_call(model, nxt, (a,)), val).mean()

    def by_sum(g_s):
        return float(before - loss_after(g_s))

    def utility(subset):
        idx = list(subset)
        g_s = {k: c[idx].sum(0) if idx else torch.zeros_like(c[0]) for k, c in contrib.items()}
        return by_sum(g_s)

    return utility, by_sum


def brute_force_midpoint(model, theta, snap, kind, contrib, val) -> torch.Tensor:
    """The midpoint rule from its definition: ``φ_i = −⟨∇L_val(θ_t + Δ(G/2)), J_Δ(G/2)·c_i⟩``,
    with Δ the real update (autograd through it) and c_i per-sample contributions."""
    step = oracles.make_step(kind, snap, theta, None, frozen=False)
    half = {k: c.sum(0) / 2 for k, c in contrib.items()}
    theta_half = step(half)
    g_half = oracles.loss_grad(model, lambda f: _val_loss(f, val).mean(), params=theta_half)
    b = next(iter(contrib.values())).shape[0]
    vals = []
    for i in range(b):
        _, tangent = jvp(step, (half,), ({k: c[i] for k, c in contrib.items()},))
        tangent = {k: torch.nan_to_num(v, nan=0.0) for k, v in tangent.items()}
        vals.append(-oracles.dot(g_half, tangent))
    return torch.stack(vals).detach()


def permutation_shapley(by_sum, contrib, n_perm: int, seed: int) -> np.ndarray:
    """Permutation Monte Carlo Shapley values (antithetic pairs), utility via summed gradients."""
    b = next(iter(contrib.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    phi = np.zeros(b)
    for _ in range(n_perm // 2):
        perm = torch.randperm(b, generator=g).tolist()
        for order in (perm, perm[::-1]):
            acc = {k: torch.zeros_like(c[0]) for k, c in contrib.items()}
            prev = 0.0
            for i in order:
                acc = {k: acc[k] + contrib[k][i] for k in acc}
                u = by_sum(acc)
                phi[i] += u - prev
                prev = u
    return phi / (2 * (n_perm // 2))


# ------------------------------------------------------------------ one run
def run_setting(setting: Setting, seed: int, batch: int, check_steps: list[int], n_perm: int = 0,
                estimators=None) -> dict[str, list[tuple[float, float]]]:
    """Per estimator, a list of (pearson, max relative error) over the checked steps."""
    estimators = ESTIMATORS if estimators is None else estimators
    torch.manual_seed(seed)
    model = make_model(setting.model).double()
    (x, y), val = make_data(setting.model, seed)
    opt = OPTIMIZERS[setting.optimizer](model.parameters(), setting.lr)
    kind = "sgd" if setting.optimizer == "sgdm" else "adam"
    trackers = {}
    for est, order in estimators:
        trackers[(est, order)] = ShapleyTracker(
            model, opt, val_data=val, val_loss_fn=_val_loss, estimator=est, order=order, record_steps=True
        )
    out: dict[str, list] = {f"{e}{'' if o == 1 else '_o2'}": [] for e, o in estimators}
    out["midpoint_bf"] = []
    if n_perm:
        out["mc_agreement"] = []
    g = torch.Generator().manual_seed(seed + 1)
    last = max(check_steps)
    for step in range(1, last + 1):
        idx = torch.randperm(len(x), generator=g)[:batch]
        xb, yb = x[idx], y[idx]
        for tr in trackers.values():
            tr.begin_batch(idx)
        F.cross_entropy(model(xb), yb).backward()
        for tr in trackers.values():
            tr.after_backward()
            tr.end_batch()
        exact = None
        if step in check_steps:
            theta = oracles.trainable(model)
            snap = oracles.snapshot_state(opt, model)
            contrib = oracles.per_sample_grads(model, lambda f, xi, yi: F.cross_entropy(f(xi), yi), (xb, yb))
            contrib = {k: v.detach() / batch for k, v in contrib.items()}
            utility, by_sum = _utility_fn(model, theta, snap, kind, contrib, val)
            if n_perm:
                exact = permutation_shapley(by_sum, contrib, n_perm, seed=step)
                second = permutation_shapley(by_sum, contrib, n_perm, seed=10_000 + step)
                out["mc_agreement"].append((pearson(exact, second), oracles.relative_error(second, exact)))
            else:
                exact = oracles.exact_shapley(utility, batch).numpy()
            bf = brute_force_midpoint(model, theta, snap, kind, contrib, val).numpy()
            out["midpoint_bf"].append((pearson(bf, exact), oracles.relative_error(bf, exact)))
        opt.step()
        opt.zero_grad()
        if exact is not None:
            for (est, order), tr in trackers.items():
                got = np.asarray(tr.store.records[-1][2])
                out[f"{est}{'' if order == 1 else '_o2'}"].append((pearson(got, exact), oracles.relative_error(got, exact)))
    for tr in trackers.values():
        tr.detach()
    return out


def summarize(rows: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for key, pairs in rows.items():
        if not pairs:
            continue
        r = np.array([p for p, _ in pairs])
        e = np.array([q for _, q in pairs])
        out[key] = {"mean": float(np.mean(r)), "p10": float(np.percentile(r, 10)), "worst": float(r.min()),
                    "max_rel_err": float(np.median(e)), "n": len(r)}
    return out


def _table(title: str, per_setting: dict[str, dict[str, list]], keys: list[str]) -> None:
    print(f"\n## {title}\n")
    print("| setting | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    pooled: dict[str, list] = {k: [] for k in keys}
    for name, rows in per_setting.items():
        s = summarize(rows)
        cells = []
        for k in keys:
            if k in s:
                cells.append(f"{s[k]['mean']:.3f} (min {s[k]['worst']:.2f})")
                pooled[k].extend(rows[k])
            else:
                cells.append("–")
        print(f"| {name} | " + " | ".join(cells) + " |")
    s = summarize(pooled)
    print("| **all: mean** | " + " | ".join(f"**{s[k]['mean']:.3f}**" if k in s else "–" for k in keys) + " |")
    print("| all: 10th pct | " + " | ".join(f"{s[k]['p10']:.3f}" if k in s else "–" for k in keys) + " |")
    print("| all: worst | " + " | ".join(f"{s[k]['worst']:.3f}" if k in s else "–" for k in keys) + " |")
    print("| all: median max rel. err | " + " | ".join(f"{s[k]['max_rel_err']:.3f}" if k in s else "–" for k in keys) + " |")
    print("| steps | " + " | ".join(str(s[k]['n']) if k in s else "–" for k in keys) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--at", type=int, nargs="+", default=[20, 21, 50, 51], help="checked steps of the spread")
    ap.add_argument("--models", nargs="+", default=["mlp", "mlp_ln", "conv", "embed"])
    ap.add_argument("--perm", type=int, default=300, help="permutations per batch-32 Monte Carlo estimate")
    ap.add_argument("--tables", nargs="+", default=["spread", "early", "batch32"])
    ap.add_argument("--quick", action="store_true", help="one seed, two models, fewer steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.at, args.models, args.perm = [0], [20, 21], ["mlp_ln", "embed"], 60
    keys = [f"{e}{'' if o == 1 else '_o2'}" for e, o in ESTIMATORS] + ["midpoint_bf"]
    t0 = time.perf_counter()
    if "spread" in args.tables:
        per = {}
        for m, o in itertools.product(args.models, OPTIMIZERS):
            for lr in LRS[o]:
                st = Setting(m, o, lr)
                rows: dict[str, list] = {}
                for seed in args.seeds:
                    for k, v in run_setting(st, seed, 8, args.at).items():
                        rows.setdefault(k, []).extend(v)
                per[st.name] = rows
        _table(f"Spread: batch 8, exact Shapley (2^8 subsets), steps {args.at}, seeds {args.seeds}", per, keys)
    if "early" in args.tables:
        per = {}
        for m, o in itertools.product(args.models[:2], ("adam", "adamw")):
            st = Setting(m, o, 1e-2)
            rows = {}
            for seed in args.seeds:
                for k, v in run_setting(st, seed, 8, list(range(1, 11))).items():
                    rows.setdefault(k, []).extend(v)
            per[st.name] = rows
        _table(f"Adam's first steps: batch 8, steps 1-10, seeds {args.seeds}", per, keys)
    if "batch32" in args.tables:
        per = {}
        for st in (Setting("mlp_ln", "adamw", 1e-2), Setting("mlp_ln", "adamw", 4e-2), Setting("mlp_ln", "adam", 4e-2)):
            rows = {}
            for seed in args.seeds:
                for k, v in run_setting(st, seed, 32, [30], n_perm=args.perm).items():
                    rows.setdefault(k, []).extend(v)
            per[st.name] = rows
        _table(f"Batch 32 after 30 steps: permutation Monte Carlo ({args.perm} permutations), seeds {args.seeds}",
               per, keys + ["mc_agreement"])
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
