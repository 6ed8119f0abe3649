"""SGLD on the localized, tempered posterior, and putting the user's model back afterwards.

One SGLD step on the sampled parameters w, with step size ε, minibatch mean loss L_batch and
ξ ~ N(0, I)::

    w ← w − ε/2·(nβ·∇L_batch(w) + γ·(w − w*)) + sqrt(ε)·ξ

Each of the C chains starts from w*, runs ``burn_in + draws * thin`` steps, and records every
``thin``-th state after burn-in as a draw: the per-sample losses ℓ_i of the traced training
samples and the observables φ_q, both relative to their values at w*, go into a moment store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate
from tqdm.auto import tqdm

from inrun_shapley.errors import ConfigurationError, NonFiniteError
from inrun_shapley.posthoc.bif.config import BIFConfig, LossFn, ParamSelection, checked_per_sample, default_n_beta
from inrun_shapley.posthoc.bif.control_variate import CoupledGaussianCV, flatten
from inrun_shapley.posthoc.bif.evaluation import evaluate
from inrun_shapley.posthoc.bif.moments import MomentStore


def select_params(model: nn.Module, selection: ParamSelection) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to sample, in ``model.named_parameters()`` order.

    Args:
        model: the model.
        selection: None (every parameter with ``requires_grad``), parameter names or
            module-name prefixes, or a predicate ``(name, param) -> bool``.

    Raises:
        ConfigurationError: a name matches nothing, or the selection is empty.
    """
    named = list(model.named_parameters())
    if selection is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(selection):
        chosen = [(n, p) for n, p in named if selection(n, p)]
    else:
        wanted = [selection] if isinstance(selection, str) else list(selection)
        unknown = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n, _ in named)]
        if unknown:
            available = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise ConfigurationError(
                f"params: no parameter or module named {unknown}; available parameters: {available}."
            )
        chosen = [(n, p) for n, p in named if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ConfigurationError(
            "params: the selection matched no parameter (with params=None, no parameter has "
            "requires_grad=True); pass parameter names or a predicate (name, param) -> bool."
        )
    return chosen


class ModelSnapshot:
    """Everything the sampler changes on the user's model, to be put back exactly.

    Attributes:
        selected: the sampled parameters (changed in place by SGLD).
        anchors: their values at w* (detached clones, same order).
    """

    def __init__(self, model: nn.Module, selected: list[tuple[str, nn.Parameter]]) -> None:
        self.model = model
        self.selected = [p for _, p in selected]
        self.anchors = [p.detach().clone() for p in self.selected]  # w*
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]

    def enter_sampling_mode(self) -> None:
        """Eval mode for every module; ``requires_grad`` on the sampled parameters only."""
        self.model.eval()
        selected_ids = {id(p) for p in self.selected}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in selected_ids)

    def anchor_norm(self) -> float:
        """‖w*‖₂ over the sampled parameters (1.0 when it is 0, so that drift stays finite)."""
        norm = math.sqrt(sum(float((w0.double() ** 2).sum()) for w0 in self.anchors))
        return norm if norm > 0 else 1.0

    def distance(self) -> float:
        """‖w − w*‖₂ over the sampled parameters, in fp64."""
        with torch.no_grad():
            squares = sum(float(((p - w0).double() ** 2).sum()) for p, w0 in zip(self.selected, self.anchors))
        return math.sqrt(squares)

    def reset_to_anchor(self) -> None:
        """Put the sampled parameters back at w*."""
        with torch.no_grad():
            for p, w0 in zip(self.selected, self.anchors):
                p.copy_(w0)

    def restore(self) -> None:
        """Put back parameters, buffers, ``requires_grad`` flags and train/eval modes."""
        with torch.no_grad():
            self.reset_to_anchor()
            for b, value in self.buffers:
                b.copy_(value)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain ``chain``: a hash of ``(seed, chain)``, so different seeds share no chain."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, chain]).generate_state(1)[0])


def _tensor_batches(loader: Any) -> Optional[Callable[[], Iterator[Any]]]:
    """For a plain single-process ``DataLoader`` over a ``TensorDataset`` with the default
    collation: a function giving one pass whose batches are the dataset's tensors indexed by the
    loader's own index lists. Same batches, bit for bit, and the same global-RNG use (the loader's
    iterator is created as usual) as iterating the loader, without collating row by row. None
    for any other loader."""
    fits = (
        isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorDataset)
        and loader.num_workers == 0 and loader.collate_fn is default_collate and not loader.pin_memory
        and loader.batch_sampler is not None
    )
    if not fits:
        return None
    tensors = loader.dataset.tensors

    def one_pass() -> Iterator[Any]:
        iterator = iter(loader)
        next_index = getattr(iterator, "_next_index", None)
        if next_index is None:  # a torch without this iterator method: iterate the loader itself
            yield from iterator
            return
        while True:
            try:
                index = torch.as_tensor(next_index(), dtype=torch.long)
            except StopIteration:
                return
            yield [t[index] for t in tensors]

    return one_pass


def cycle(loader: Any) -> Iterator[Any]:
    """Iterate ``loader`` again and again (a fresh pass, reshuffled if it shuffles, each time).

    A ``DataLoader`` over a ``TensorDataset`` is read by index (see :func:`_tensor_batches`).

    Raises:
        ConfigurationError: a pass yields no batch.
    """
    one_pass = _tensor_batches(loader)
    while True:
        empty = True
        for batch in (one_pass() if one_pass is not None else loader):
            empty = False
            yield batch
        if empty:
            raise ConfigurationError("train_loader yielded no batch.")


@dataclass
class SamplerTraces:
    """Scalar traces of one sampling run, fp64 on the CPU.

    Attributes:
        loss: ``[C, T]`` mean traced training loss at each draw.
        observable: ``[C, T]`` mean observable at each draw.
        drift: ``[C, T]`` ``‖w − w*‖₂ / ‖w*‖₂`` at each draw.
        sgld_loss: ``[C, steps_per_chain]`` minibatch mean loss before each SGLD step.
    """

    loss: torch.Tensor
    observable: torch.Tensor
    drift: torch.Tensor
    sgld_loss: torch.Tensor


class SGLDSampler:
    """Runs the C chains on a model prepared by :meth:`ModelSnapshot.enter_sampling_mode`.

    Call :meth:`measure_anchor` once at w*, then :meth:`run`. The caller restores the model.

    Attributes:
        n_beta: nβ in use; resolved from the first minibatch (B / log B) when it starts None.
        ref_x: ``[n_x]`` traced training losses at w* (after :meth:`measure_anchor`).
        ref_y: ``[n_y]`` flattened observables at w*.
        observable_shape: ``[n_queries, ...]`` shape of the observables.
        loss_at_optimum: mean of ``ref_x``.
        limit: divergence threshold on the minibatch and mean traced losses.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        observable_fn: LossFn,
        train_loader: Any,
        train_samples: Any,
        queries: Any,
        config: BIFConfig,
        snapshot: ModelSnapshot,
        n_beta: Optional[float],
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.observable_fn = observable_fn
        self.train_loader = train_loader
        self.train_samples = train_samples
        self.queries = queries
        self.config = config
        self.snapshot = snapshot
        self.n_beta = n_beta
        self.anchor_norm = snapshot.anchor_norm()
        self.control_variate: Optional[CoupledGaussianCV] = None  # set by the caller after measure_anchor

    def traced_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ℓ [n_x], φ [n_queries, ...])`` at the current weights, without gradients."""
        cfg = self.config
        with torch.no_grad():
            x = evaluate(self.model, self.loss_fn, self.train_samples, cfg.eval_batch_size, "train_samples", True)
            y = evaluate(self.model, self.observable_fn, self.queries, cfg.eval_batch_size, "queries", False)
        return x, y

    def measure_anchor(self) -> None:
        """Evaluate the traced values at w* and set the divergence limit.

        Raises:
            NonFiniteError: a loss or observable is not finite at w*.
        """
        ref_x, ref_y = self.traced_values()
        self.observable_shape = tuple(ref_y.shape)
        self.ref_x, self.ref_y = ref_x, ref_y.reshape(-1)
        self.loss_at_optimum = float(ref_x.double().mean())
        if not math.isfinite(self.loss_at_optimum) or not bool(torch.isfinite(self.ref_y).all()):
            raise NonFiniteError(
                "BIF: the losses or observables are not finite at w* (before sampling); check the model and loss_fn."
            )
        cfg = self.config
        self.limit = cfg.divergence_factor * max(abs(self.loss_at_optimum), cfg.divergence_floor)

    def run(self, store: MomentStore, progress: bool) -> SamplerTraces:
        """Run every chain from w*, recording each draw into ``store``.

        Raises:
            NonFiniteError: a chain diverged (see :meth:`_diverged`).
            ConfigurationError: ``loss_fn`` returned no per-sample losses.
        """
        cfg = self.config
        steps = cfg.steps_per_chain
        traces = SamplerTraces(
            loss=torch.empty(cfg.chains, cfg.draws, dtype=torch.float64),
            observable=torch.empty(cfg.chains, cfg.draws, dtype=torch.float64),
            drift=torch.empty(cfg.chains, cfg.draws, dtype=torch.float64),
            sgld_loss=torch.empty(cfg.chains, steps, dtype=torch.float64),
        )
        bar = tqdm(total=cfg.chains * steps, disable=not progress, desc="BIF sampling", unit="step")
        try:
            for chain in range(cfg.chains):
                self._run_chain(chain, store, traces, bar)
        finally:
            bar.close()
        return traces

    def _run_chain(self, chain: int, store: MomentStore, traces: SamplerTraces, bar: Any) -> None:
        """One chain from w*: its noise from a generator per device seeded by :func:`chain_seed`,
        the global RNG (shuffling loaders) forked and seeded the same way."""
        cfg = self.config
        self.snapshot.reset_to_anchor()
        seed = chain_seed(cfg.seed, chain)
        sampled = self.snapshot.selected
        generators: dict[torch.device, torch.Generator] = {}
        for p in sampled:
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        cuda = sorted({p.device.index or 0 for p in sampled if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            batches = cycle(self.train_loader)
            for step in range(cfg.steps_per_chain):
                self._step(chain, step, next(batches), generators, traces)
                bar.update(1)
                offset = step - cfg.resolved_burn_in + 1
                if offset <= 0 or offset % cfg.thin:
                    continue
                draw = offset // cfg.thin - 1
                self._record_draw(chain, step, draw, store, traces, bar)

    def _step(
        self, chain: int, step: int, batch: Any, generators: dict[torch.device, torch.Generator], traces: SamplerTraces
    ) -> None:
        """One SGLD step on ``batch``; records the minibatch loss before the step."""
        cfg = self.config
        burn_in = cfg.resolved_burn_in
        sampled, anchors = self.snapshot.selected, self.snapshot.anchors
        with torch.enable_grad():
            per_sample = checked_per_sample(self.loss_fn(self.model, batch))
            if self.n_beta is None:
                self.n_beta = default_n_beta(per_sample.shape[0])
            loss = per_sample.mean()
            value = float(loss.detach())
            traces.sgld_loss[chain, step] = value
            where = (f"burn-in step {step}" if step < burn_in
                     else f"draw {(step - burn_in) // cfg.thin} (SGLD step {step})")
            if not math.isfinite(value):
                raise self._diverged(chain, where, f"the minibatch loss is {value}")
            if value > self.limit:
                raise self._diverged(chain, where, f"the minibatch loss {value:.4g} exceeds "
                                     f"{cfg.divergence_factor:g} x the loss at w* ({self.limit:.4g})")
            grads = torch.autograd.grad(loss, sampled, allow_unused=True)
        half_eps, noise_scale = cfg.step_size / 2, math.sqrt(cfg.step_size)
        noises = []
        with torch.no_grad():
            for p, g, w0 in zip(sampled, grads, anchors):
                force = (p - w0).mul_(cfg.gamma)
                if g is not None:
                    force.add_(g, alpha=self.n_beta)
                p.add_(force, alpha=-half_eps)
                noise = torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)
                p.add_(noise, alpha=noise_scale)
                noises.append(noise)
            if self.control_variate is not None:
                self.control_variate.step(flatten(noises, chains=False), chain)

    def _record_draw(
        self, chain: int, step: int, draw: int, store: MomentStore, traces: SamplerTraces, bar: Any
    ) -> None:
        """Evaluate the traced values at the current state and record them as a draw."""
        cfg = self.config
        where = f"draw {draw} (SGLD step {step})"
        x, y = self.traced_values()
        y = y.reshape(-1)
        dist = self.snapshot.distance()
        mean_x = float(x.double().mean())
        if not (math.isfinite(mean_x) and math.isfinite(dist) and bool(torch.isfinite(y).all())):
            raise self._diverged(chain, where, "a traced loss, observable or parameter is NaN/inf")
        if mean_x > self.limit:
            raise self._diverged(chain, where, f"the mean traced loss {mean_x:.4g} exceeds "
                                 f"{cfg.divergence_factor:g} x the loss at w* ({self.limit:.4g})")
        store.add(chain, draw, (x - self.ref_x).cpu(), (y - self.ref_y).cpu())
        if self.control_variate is not None:
            self.control_variate.record(chain)
        traces.loss[chain, draw] = mean_x
        traces.observable[chain, draw] = float(y.double().mean())
        traces.drift[chain, draw] = dist / self.anchor_norm
        if draw % 50 == 0:
            bar.set_postfix(chain=chain, loss=f"{mean_x:.4g}", drift=f"{dist / self.anchor_norm:.2e}")

    def _diverged(self, chain: int, where: str, what: str) -> NonFiniteError:
        """The error for a diverged chain, naming the knobs to turn."""
        cfg, n_beta = self.config, self.n_beta
        return NonFiniteError(
            f"BIF sampler diverged in chain {chain} at {where}: {what}. Lower config.step_size "
            f"(now {cfg.step_size:g}) or raise config.gamma (now {cfg.gamma:g}) to keep the chain near "
            f"w*, or lower config.n_beta (now {n_beta:g}); keep step_size*gamma <= 0.1 "
            f"(now {cfg.step_size * cfg.gamma:g}). If the loss merely grows a lot without diverging, "
            f"raise config.divergence_factor (now {cfg.divergence_factor:g})."
        )


__all__ = ["ModelSnapshot", "SGLDSampler", "SamplerTraces", "chain_seed", "cycle", "select_params"]
