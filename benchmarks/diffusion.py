"""Attribution for a small diffusion model: in-run values, adjoint, TracIn, learned aspect weights.

Setup (``benchmarks.common.diffusion``): a DDPM (T = 50 linear-beta steps) whose ε-prediction
MLP with a sinusoidal timestep embedding is trained with AdamW on ``n_train`` scikit-learn
digits (8×8, in [-1, 1]) with a FIXED-noise loss (every image carries ``K`` fixed
(timestep, noise) pairs, the same in every subset model), so every utility is a deterministic
function of the weights. Per seed:

1. a generator model (plain loop) is trained on all ``n_train`` images and produces the
   queries: ``n_queries`` DDPM samples (LDS queries) and ``n_fit`` more (weight-fitting
   queries). The utility of a query is ``−ℓ``: minus its fixed-noise denoising loss over
   ``K_q`` evenly spread timesteps with fixed noises.
2. the same run again through Lightning with ``inrun_shapley.callbacks.ShapleyCallback``
   (``per_query=True``, default estimator ``midpoint``, ``record_trajectory=``): the in-run
   values need the queries before training, and the run is deterministic, so it replays the
   generator's training (the script prints how far the two models' weights differ). It also
   saves checkpoints and Adam preconditioners for TracIn (``n_checkpoints`` evenly spaced steps).
3. methods, each ``[n_train, n_queries]`` with positive = raises the utility: in-run values;
   the adjoint pass through the recording; TracIn (``Σ_c η_c ⟨∇ℓ_q, ∇ℓ_i⟩`` over the
   checkpoints), plain and Adam-preconditioned, split per parameter tensor
   (``compute_group_components``), with uniform weights or weights fitted label-free
   (``fit_weights``) on the fit queries or on the LDS queries themselves.
4. LDS: ``n_models`` retrained on random 50 % subsets (same init, batch-order generator and
   noise), cached under ``benchmarks/.diffusion_cache/``; Spearman between the predicted
   (sum of scores over the subset) and measured utilities, averaged over queries.
5. aspects of a generated digit: its class (margin of a separate classifier, trained on held-out
   digits) and its ink (total intensity). For each aspect the query gradient is the aspect
   measured on the model's one-step reconstruction x̂0 of the sample noised at fixed
   timesteps (class: −margin of the sample's predicted class; ink: −s·ink with s the sign of
   the sample's ink minus the training mean). One weight vector is fitted per aspect on those
   components, then applied to the ordinary TracIn components (query = denoising loss).
   Measured: share of the top-k training images with the sample's class, and their mean |ink
   difference| to the sample, under uniform weights vs each aspect's weights.
6. a PNG per generated sample: the sample, its top training images under uniform weights and
   under each aspect's weights.

Learned weights are a proxy; where they do not raise LDS the table says so.

Run:  python -m benchmarks.diffusion --quick                       (smoke, ~2 min on 1 thread)
      python -m benchmarks.diffusion --seeds 0 1 2 --out diffusion_out   (recorded figures)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cli
from benchmarks.common import diffusion as dm
from inrun_shapley.metrics import linear_datamodeling_score
from inrun_shapley.posthoc.weighting import (
    FitConfig,
    GroupWeights,
    adam_preconditioner,
    compute_group_components,
    fit_weights,
    reweigh,
)

CACHE = Path(__file__).resolve().parent / ".diffusion_cache"


@dataclass(frozen=True)
class Config:
    """Sizes of one run (defaults: the recorded figures; :meth:`quick`: the smoke run)."""

    n_train: int = 500
    n_class: int = 600
    K: int = 8
    K_query: int = 16
    epochs: int = 150
    batch_size: int = 50
    lr: float = 2e-3
    weight_decay: float = 0.01
    n_queries: int = 12
    n_fit: int = 16
    n_models: int = 24
    n_checkpoints: int = 5
    trajectory_every: int = 10
    top_k: int = 10

    @classmethod
    def quick(cls) -> Config:
        return cls(n_train=200, epochs=40, n_queries=6, n_fit=6, n_models=8, trajectory_every=5)

    def key(self, seed: int) -> str:
        """Cache key of the subset models: everything that changes them, and the seed."""
        blob = json.dumps({**asdict(self), "seed": seed}, sort_keys=True) + inspect.getsource(dm)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def query_timesteps(K_query: int) -> torch.Tensor:
    """``K_query`` steps evenly spread over ``[0, T)``: the utility's fixed timesteps."""
    return torch.linspace(0, dm.T_STEPS - 1, K_query).round().long()


def aspect_timesteps(K_query: int) -> torch.Tensor:
    """Steps of the aspect measurements: the first 60 % of the chain (x̂0 is informative there)."""
    return torch.linspace(0, int(0.6 * dm.T_STEPS) - 1, K_query).round().long()


def utility(model, packed_queries: torch.Tensor) -> np.ndarray:
    """``−ℓ`` of every query (``[Q]``): higher = the model explains the sample better."""
    with torch.no_grad():
        return (-dm.per_sample_loss(model, packed_queries)).double().numpy()


# ----------------------------------------------------------------------------- LDS ground truth
def subset_utilities(train: torch.Tensor, queries: torch.Tensor, cfg: Config, seed: int):
    """``(subsets [M, n_train] bool, utilities [M, Q])`` of the retrained 50 % subset models.

    Cached per model in ``.diffusion_cache/<key>.npz`` (the queries' hash is part of the check:
    another generator would give other queries)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"seed{seed}_{cfg.key(seed)}.npz"
    qhash = hashlib.sha256(queries.numpy().tobytes()).hexdigest()[:16]
    rng = np.random.default_rng(10_000 + seed)
    subsets = np.zeros((cfg.n_models, cfg.n_train), dtype=bool)
    for m in range(cfg.n_models):
        subsets[m, rng.choice(cfg.n_train, cfg.n_train // 2, replace=False)] = True
    outputs = np.full((cfg.n_models, len(queries)), np.nan)
    if path.exists():
        with np.load(path) as f:
            if str(f["qhash"]) == qhash and np.array_equal(f["subsets"], subsets):
                outputs = f["outputs"]
    todo = np.flatnonzero(np.isnan(outputs).any(1))
    t0 = time.perf_counter()
    for m in todo:
        idx = torch.from_numpy(np.flatnonzero(subsets[m]))
        model = dm.train_denoiser(train[idx], seed=1000 * seed, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
        outputs[m] = utility(model, queries)
        np.savez(path, subsets=subsets, outputs=outputs, qhash=np.array(qhash))
    if len(todo):
        print(f"  retrained {len(todo)} subset models in {time.perf_counter() - t0:.1f}s (cache {path.name})")
    else:
        print(f"  {cfg.n_models} subset models from the cache ({path.name})")
    return subsets, outputs


# ------------------------------------------------------------------------- the attributed run
def lightning_run(train: torch.Tensor, queries: torch.Tensor, cfg: Config, seed: int, workdir: Path):
    """Train through Lightning with ``ShapleyCallback``; returns (net, in-run values, checkpoints,
    preconditioners, recording folder, seconds)."""
    import lightning.pytorch as pl

    from inrun_shapley.callbacks import ShapleyCallback

    class Denoising(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = dm.DiffusionNet(seed=1000 * seed)

        def forward(self, packed):
            return self.net(packed)

        def training_step(self, batch, batch_idx):
            (packed,) = batch
            return dm.per_sample_loss(self, packed).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps = len(dm.batch_order(len(train), 1000 * seed, cfg.epochs, cfg.batch_size))
    every = max(1, steps // cfg.n_checkpoints)
    ckpts, preconds = [], []

    class Checkpoints(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step % every == 0:
                ckpts.append({n: p.detach().clone() for n, p in module.net.named_parameters()})
                preconds.append(adam_preconditioner(trainer.optimizers[0], module.net))

    rec = workdir / "trajectory"
    cb = ShapleyCallback(val_data=(queries,), val_loss_fn=lambda m, b: dm.per_sample_loss(m, b[0]),
                         per_query=True, record_trajectory=str(rec), trajectory_every=cfg.trajectory_every)
    module = Denoising()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
                         callbacks=[cb, Checkpoints()])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, dm.loader(train, 1000 * seed, cfg.epochs, cfg.batch_size))
    return module, np.asarray(cb.values, dtype=np.float64), ckpts, preconds, rec, time.perf_counter() - t0


def adjoint_scores(module, rec: Path, train: torch.Tensor, queries: torch.Tensor):
    """Adjoint pass through the recorded run; positive = including the image raises ``−ℓ_q``."""
    from inrun_shapley.posthoc.adjoint import adjoint_influence

    info: dict = {}
    scores = adjoint_influence(
        module, rec, (train,), lambda m, b: dm.per_sample_loss(m, b[0]), queries,
        lambda m, q: -dm.per_sample_loss(m, q), output_kind="score", progress=False, info=info,
        jacobian="loo",  # as recorded in RESULTS.md §11 (the default before issue 27)
    )
    return scores, info


# ----------------------------------------------------------------------------------- one seed
def run_seed(seed: int, cfg: Config, out: Path | None, fit_config: FitConfig) -> dict:
    t_start = time.perf_counter()
    x, y, xc, yc = dm.load_images(cfg.n_train, cfg.n_class, seed)
    train = dm.fixed_noise(x, cfg.K, seed=100 + seed)
    kw = dict(seed=1000 * seed, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
              weight_decay=cfg.weight_decay)

    t0 = time.perf_counter()
    generator = dm.train_denoiser(train, **kw)
    samples = dm.sample(generator, cfg.n_queries + cfg.n_fit, seed=200 + seed)
    q_img, f_img = samples[: cfg.n_queries], samples[cfg.n_queries:]
    queries = dm.fixed_noise(q_img, cfg.K_query, seed=300 + seed, timesteps=query_timesteps(cfg.K_query))
    fit_q = dm.fixed_noise(f_img, cfg.K_query, seed=400 + seed, timesteps=query_timesteps(cfg.K_query))
    t_gen = time.perf_counter() - t0

    classifier = dm.train_classifier(xc, yc, seed)
    with torch.no_grad():
        q_class = classifier(q_img).argmax(1)
        q_conf = classifier(q_img).softmax(1).max(1).values
        clf_acc = float((classifier(x).argmax(1) == y).float().mean())
    print(f"  generator trained + {len(samples)} samples in {t_gen:.1f}s; classifier accuracy on the "
          f"training digits {clf_acc:.3f}; queries' predicted classes {q_class.tolist()} "
          f"(mean confidence {float(q_conf.mean()):.2f})")

    subsets, outputs = subset_utilities(train, queries, cfg, seed)

    with tempfile.TemporaryDirectory() as tmp:
        module, inrun, ckpts, preconds, rec, t_run = lightning_run(train, queries, cfg, seed, Path(tmp))
        drift = max(float((a - b).detach().abs().max()) for a, b in zip(module.net.parameters(), generator.parameters()))
        print(f"  Lightning run with ShapleyCallback in {t_run:.1f}s; max |weight difference| to the "
              f"generator {drift:.2e}")
        t0 = time.perf_counter()
        adjoint, info = adjoint_scores(module, rec, train, queries)
        t_adj = time.perf_counter() - t0
        print(f"  adjoint pass in {t_adj:.1f}s (damping rho={info.get('rho')})")

    net = module.net.eval()
    lrs = [cfg.lr] * len(ckpts)
    t0 = time.perf_counter()

    def components(query, precond, query_loss_fn=dm.denoising_loss_fn, target=None):
        q = (query, query if target is None else target)
        return compute_group_components(net, dm.denoising_loss_fn, (train, train), q, "tensor",
                                        checkpoints=ckpts, lrs=lrs, preconditioner=precond,
                                        query_loss_fn=query_loss_fn, batch_size=100)

    comps = {}
    for base, pc in (("tracin", None), ("tracin+adam", preconds)):
        comps[base] = (components(queries, pc), components(fit_q, pc))
    t_comp = time.perf_counter() - t0

    lds = {"in-run (midpoint)": linear_datamodeling_score(inrun, subsets, outputs),
           "adjoint": linear_datamodeling_score(adjoint, subsets, outputs)}
    weights = {}
    for base, (c_lds, c_fit) in comps.items():
        w_fit = fit_weights(c_fit, fit_config, aspect=f"{base} fit queries")
        w_self = fit_weights(c_lds, fit_config, aspect=f"{base} LDS queries")
        weights[base] = w_fit
        for label, w in (("uniform", GroupWeights.uniform(c_lds.group_names)),
                         ("learned/fit-queries", w_fit), ("learned/LDS-queries", w_self)):
            lds[f"{base} {label}"] = linear_datamodeling_score(reweigh(c_lds, w), subsets, outputs)

    aspects = aspect_test(net, train, x, y, q_img, q_class, classifier, comps["tracin"][0], components,
                          cfg, seed, fit_config, out)
    return {"lds": lds, "weights": weights, "aspects": aspects,
            "timing": {"generator": t_gen, "lightning": t_run, "adjoint": t_adj, "components": t_comp,
                       "total": time.perf_counter() - t_start}}


def aspect_test(net, train, x, y, q_img, q_class, classifier, c_loss, components, cfg: Config, seed: int,
                fit_config: FitConfig, out: Path | None) -> dict:
    """Fit one weight vector per aspect; compare the top-k training images of the ordinary
    (denoising-loss) TracIn scores under uniform and aspect weights."""
    ts = aspect_timesteps(cfg.K_query)
    aspect_q = dm.fixed_noise(q_img, cfg.K_query, seed=500 + seed, timesteps=ts)
    train_ink = dm.ink(x)
    direction = torch.sign(dm.ink(q_img) - train_ink.mean())
    c_class = components(aspect_q, None, dm.class_aspect_loss(classifier), q_class)
    c_ink = components(aspect_q, None, dm.ink_aspect_loss, direction)
    w = {"uniform": GroupWeights.uniform(c_loss.group_names),
         "class weights": fit_weights(c_class, fit_config, aspect="class"),
         "ink weights": fit_weights(c_ink, fit_config, aspect="ink")}
    k = cfg.top_k
    rows, tops = {}, {}
    y_np, ink_np, q_ink = y.numpy(), train_ink.numpy(), dm.ink(q_img).numpy()
    for name, wv in w.items():
        top = np.argsort(-reweigh(c_loss, wv), axis=0)[:k].T  # [Q, k]
        tops[name] = top
        same = (y_np[top] == q_class.numpy()[:, None]).mean(1)
        dink = np.abs(ink_np[top] - q_ink[:, None]).mean(1)
        rows[name] = {"same_class": same, "ink_diff": dink}
    # the aspect measurements' own scores, with uniform and with the aspect's weights
    for name, c, wv in (("class measurement", c_class, None), ("class meas.+weights", c_class, w["class weights"]),
                        ("ink measurement", c_ink, None), ("ink meas.+weights", c_ink, w["ink weights"])):
        top = np.argsort(-(c.total() if wv is None else reweigh(c, wv)), axis=0)[:k].T
        rows[name] = {"same_class": (y_np[top] == q_class.numpy()[:, None]).mean(1),
                      "ink_diff": np.abs(ink_np[top] - q_ink[:, None]).mean(1)}
    rows["random"] = {"same_class": np.array([np.mean(y_np == c) for c in q_class.numpy()]),
                      "ink_diff": np.abs(ink_np[None, :] - q_ink[:, None]).mean(1)}
    if out is not None:
        plot_samples(q_img, q_class, x, y, tops, out / f"diffusion_seed{seed}", k=min(k, 6))
    return {"rows": rows, "weights": {n: v for n, v in w.items() if n != "uniform"}}


def plot_samples(q_img, q_class, x, y, tops: dict, prefix: Path, k: int) -> None:
    """One PNG per generated sample: the sample, then one row of top-k images per weighting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    prefix.parent.mkdir(parents=True, exist_ok=True)
    for q in range(len(q_img)):
        fig = Figure(figsize=(1.3 * (k + 1), 1.5 * len(tops)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(tops), k + 1, squeeze=False)
        for r, (name, top) in enumerate(tops.items()):
            axes[r, 0].imshow(q_img[q].view(8, 8), cmap="gray_r", vmin=-1, vmax=1)
            axes[r, 0].set_title(f"sample ({int(q_class[q])})", fontsize=8)
            axes[r, 0].set_ylabel(name, fontsize=8)
            for c in range(k):
                i = int(top[q, c])
                axes[r, c + 1].imshow(x[i].view(8, 8), cmap="gray_r", vmin=-1, vmax=1)
                axes[r, c + 1].set_title(f"#{i} ({int(y[i])})", fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(f"{prefix}_sample{q}.png", dpi=80)


# -------------------------------------------------------------------------------------- report
def report(results: dict[int, dict], cfg: Config) -> None:
    seeds = list(results)
    print(f"\n=== LDS on {cfg.n_queries} generated samples, M={cfg.n_models} subset models, seeds {seeds}")
    names = list(results[seeds[0]]["lds"])
    for name in names:
        vals = np.array([results[s]["lds"][name] for s in seeds])
        print(f"  {name:<36} {vals.mean():+.4f} ± {vals.std():.4f}   " + " ".join(f"{v:+.4f}" for v in vals))
    print("\n=== learned − uniform LDS (paired per seed)")
    for base in ("tracin", "tracin+adam"):
        u = np.array([results[s]["lds"][f"{base} uniform"] for s in seeds])
        for label in ("learned/fit-queries", "learned/LDS-queries"):
            d = np.array([results[s]["lds"][f"{base} {label}"] for s in seeds]) - u
            print(f"  {base:<12} {label:<20} {d.mean():+.4f} ± {d.std():.4f}   " + " ".join(f"{v:+.4f}" for v in d))
    print(f"\n=== aspect test: top-{cfg.top_k} training images of the denoising-loss TracIn scores "
          "(mean over queries and seeds; per-seed means in brackets)")
    rows = list(results[seeds[0]]["aspects"]["rows"])
    for name in rows:
        sc = [float(results[s]["aspects"]["rows"][name]["same_class"].mean()) for s in seeds]
        di = [float(results[s]["aspects"]["rows"][name]["ink_diff"].mean()) for s in seeds]
        print(f"  {name:<20} same class {np.mean(sc):.3f} [{' '.join(f'{v:.3f}' for v in sc)}]   "
              f"|ink diff| {np.mean(di):.2f} [{' '.join(f'{v:.2f}' for v in di)}]")
    print("  paired (aspect weights − uniform), per query over all seeds:")
    for name, metric in (("class weights", "same_class"), ("ink weights", "ink_diff")):
        d = np.concatenate([results[s]["aspects"]["rows"][name][metric] - results[s]["aspects"]["rows"]["uniform"][metric]
                            for s in seeds])
        better = (d > 0).sum() if metric == "same_class" else (d < 0).sum()
        worse = (d < 0).sum() if metric == "same_class" else (d > 0).sum()
        print(f"  {name:<14} {metric:<10} mean diff {d.mean():+.3f} (better on {better}, worse on {worse}, "
              f"tied {len(d) - better - worse} of {len(d)} queries)")
    for s in seeds:
        print(f"\n  seed {s} weights:")
        for label, wv in {**results[s]["weights"], **results[s]["aspects"]["weights"]}.items():
            print(f"    {label:<14} " + " ".join(f"{g}={v:.2f}" for g, v in wv.as_dict().items()))
        t = results[s]["timing"]
        print("    seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_quick(parser, help="tiny sizes for a smoke run (about 2 minutes), never a recorded figure")
    cli.add_seeds(parser, [0])
    parser.add_argument("--models", type=int, default=None, help="subset models per seed (default 24, quick 8)")
    cli.add_out(parser, "folder for the per-sample PNGs (default: no plots)")
    cli.add_threads(parser)
    args = parser.parse_args(argv)
    cli.set_threads(args.threads)
    cfg = Config.quick() if args.quick else Config()
    if args.models:
        cfg = replace(cfg, n_models=args.models)
    fit_config = FitConfig(seed=0, restarts=4, steps=100) if args.quick else FitConfig(seed=0)
    out = Path(args.out) if args.out else None
    print(cli.command_line("diffusion", argv))
    results = {}
    for seed in args.seeds:
        print(f"\n--- seed {seed}")
        results[seed] = run_seed(seed, cfg, out, fit_config)
        print("  LDS: " + ", ".join(f"{k} {v:+.4f}" for k, v in results[seed]["lds"].items()))
    report(results, cfg)
    return results


if __name__ == "__main__":
    main()
