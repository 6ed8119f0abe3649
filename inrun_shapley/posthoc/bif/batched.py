"""All C SGLD chains as one computation: parameters stacked ``[C, ...]``, vmapped over chains.

Same chains as :class:`~inrun_shapley.posthoc.bif.sampler.SGLDSampler`, step for step: chain c
draws its Gaussian noise from its own generator seeded by ``chain_seed(seed, c)`` in the same order
(parameter by parameter, step by step), and reads its own minibatches from its own pass over the
loader with the global RNG it would have had alone (the CPU RNG state is kept per chain and swapped
in around each ``next(batch)``). So each chain is the sequential chain up to floating-point
rounding of the vmapped gradient (the updates themselves are the same elementwise operations).

What is batched: the minibatch gradient of the C chains (one ``vmap(grad)`` call on the C
minibatches stacked, or on the shared one), the update, and at every draw the per-sample losses of
the traced training samples and the observables of the C chains (one vmapped evaluation per chunk
of ``eval_batch_size`` rows). Minibatches of unequal shapes across chains at one step (a short
last batch) are evaluated chain by chain for that step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import grad_and_value
from tqdm.auto import tqdm

from inrun_shapley.batches import map_tensors
from inrun_shapley.errors import ConfigurationError
from inrun_shapley.posthoc.bif.config import checked_per_sample, default_n_beta
from inrun_shapley.posthoc.bif.control_variate import flatten
from inrun_shapley.posthoc.bif.functional import FunctionalModel, Params
from inrun_shapley.posthoc.bif.moments import MomentStore
from inrun_shapley.posthoc.bif.sampler import SamplerTraces, SGLDSampler, chain_seed, cycle


def _leaf_shapes(batch: Any) -> list:
    shapes: list = []
    map_tensors(lambda t: shapes.append((tuple(t.shape), t.dtype)), batch)
    return shapes


def _stack(batches: list) -> Any:
    """Stack C batches of identical structure leaf by leaf along a new leading dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(batches)
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in batches]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_stack([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([b[i] for b in batches]) for i in range(len(first)))
    return first


class BatchedSGLDSampler(SGLDSampler):
    """The C chains of :class:`SGLDSampler`, run together (see the module docstring).

    Same construction, :meth:`measure_anchor` and :meth:`run` contract as the sequential sampler;
    the model's parameters are never written (chains live in ``[C, ...]`` tensors).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = [n for n, p in self.model.named_parameters() if any(p is q for q in self.snapshot.selected)]
        self.functional = FunctionalModel(self.model, names)
        self.anchor_params: Params = dict(zip(names, self.snapshot.anchors))

    def adopt_anchor(self, other: SGLDSampler) -> None:
        """Take the values at w* that ``other.measure_anchor()`` measured (no second evaluation)."""
        for name in ("ref_x", "ref_y", "observable_shape", "loss_at_optimum", "limit"):
            setattr(self, name, getattr(other, name))

    def stacked_traced_values(self, stacked: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ℓ [C, n_x], φ [C, n_queries, ...])`` of the C stacked parameter sets."""
        cfg, f = self.config, self.functional
        x = f.traced(self.loss_fn, stacked, self.train_samples, cfg.eval_batch_size, "train_samples", True)
        y = f.traced(self.observable_fn, stacked, self.queries, cfg.eval_batch_size, "queries", False)
        return x, y

    def probe(self) -> None:
        """Check that vmapped evaluation at w* reproduces the plain one (after measure_anchor).

        Raises:
            ConfigurationError: the model or functions cannot be vmapped, or give other values
                under vmap; the message says to use ``batched=False``.
        """
        stacked = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in self.anchor_params.items()}
        try:
            x, y = self.stacked_traced_values(stacked)
        except Exception as exc:  # any failure of torch.func on user code
            raise ConfigurationError(
                f"BIF batched=True: evaluating the model under torch.func.vmap failed ({type(exc).__name__}: "
                f"{exc}); set BIFConfig(batched=False) to run the chains one after another."
            ) from exc
        same = (torch.allclose(x[1], self.ref_x, rtol=1e-4, atol=1e-6)
                and torch.allclose(y[1].reshape(-1), self.ref_y, rtol=1e-4, atol=1e-6))
        if not same:
            raise ConfigurationError(
                "BIF batched=True: the model gives different values under torch.func.vmap than when "
                "called directly; set BIFConfig(batched=False)."
            )

    def run(self, store: MomentStore, progress: bool) -> SamplerTraces:
        """Run the C chains together from w*, recording each draw into ``store``.

        Raises:
            NonFiniteError: a chain diverged.
            ConfigurationError: ``loss_fn`` returned no per-sample losses.
        """
        cfg = self.config
        chains, steps = cfg.chains, cfg.steps_per_chain
        traces = SamplerTraces(
            loss=torch.empty(chains, cfg.draws, dtype=torch.float64),
            observable=torch.empty(chains, cfg.draws, dtype=torch.float64),
            drift=torch.empty(chains, cfg.draws, dtype=torch.float64),
            sgld_loss=torch.empty(chains, steps, dtype=torch.float64),
        )
        stacked = {k: v.unsqueeze(0).repeat(chains, *([1] * v.dim())) for k, v in self.anchor_params.items()}
        seeds = [chain_seed(cfg.seed, c) for c in range(chains)]
        device = next(iter(self.anchor_params.values())).device  # one device (checked by the caller)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        bar = tqdm(total=chains * steps, disable=not progress, desc="BIF sampling (batched)", unit="step")
        try:
            with torch.random.fork_rng(devices=[]):
                states = []
                for s in seeds:
                    torch.manual_seed(s)
                    states.append(torch.get_rng_state())
                iterators = [cycle(self.train_loader) for _ in range(chains)]
                for step in range(steps):
                    batches = []
                    for c in range(chains):
                        torch.set_rng_state(states[c])
                        batches.append(next(iterators[c]))
                        states[c] = torch.get_rng_state()
                    self._step_all(step, batches, stacked, generators, traces)
                    bar.update(chains)
                    offset = step - cfg.resolved_burn_in + 1
                    if offset <= 0 or offset % cfg.thin:
                        continue
                    self._record_all(step, offset // cfg.thin - 1, stacked, store, traces, bar)
        finally:
            bar.close()
        return traces

    def _gradients(self, batches: list, stacked: Params) -> tuple[Params, torch.Tensor]:
        """Per-chain minibatch mean-loss gradients ``[C, ...]`` and losses ``[C]``."""
        f = self.functional
        if all(_leaf_shapes(b) == _leaf_shapes(batches[0]) for b in batches):
            return f.mean_loss_grads(self.loss_fn, stacked, _stack(batches), shared_batch=False)
        grads, values = [], []
        for c, batch in enumerate(batches):  # unequal shapes this step: one chain at a time
            params = {k: v[c] for k, v in stacked.items()}
            with torch.enable_grad():
                g, value = grad_and_value(lambda p: f.call(self.loss_fn, p, batch).mean())(params)
            grads.append(g)
            values.append(value)
        return {k: torch.stack([g[k] for g in grads]) for k in stacked}, torch.stack(values)

    def _check_loss_shape(self, batch: Any) -> None:
        """The first step: per-sample losses, and nβ from the batch size when it is None."""
        with torch.no_grad():
            per_sample = checked_per_sample(self.functional.call(self.loss_fn, self.anchor_params, batch))
        if self.n_beta is None:
            self.n_beta = default_n_beta(per_sample.shape[0])

    def _step_all(
        self, step: int, batches: list, stacked: Params, generators: list[torch.Generator], traces: SamplerTraces
    ) -> None:
        """One SGLD step of every chain; records each chain's minibatch loss before the step."""
        cfg = self.config
        if step == 0:
            self._check_loss_shape(batches[0])
        grads, values = self._gradients(batches, stacked)
        burn_in = cfg.resolved_burn_in
        where = (f"burn-in step {step}" if step < burn_in
                 else f"draw {(step - burn_in) // cfg.thin} (SGLD step {step})")
        for c, value in enumerate(values.double().tolist()):
            traces.sgld_loss[c, step] = value
            if not math.isfinite(value):
                raise self._diverged(c, where, f"the minibatch loss is {value}")
            if value > self.limit:
                raise self._diverged(c, where, f"the minibatch loss {value:.4g} exceeds "
                                     f"{cfg.divergence_factor:g} x the loss at w* ({self.limit:.4g})")
        half_eps, noise_scale = cfg.step_size / 2, math.sqrt(cfg.step_size)
        noises = []
        with torch.no_grad():
            for name, w0 in self.anchor_params.items():
                p = stacked[name]
                force = (p - w0).mul_(cfg.gamma)
                force.add_(grads[name], alpha=self.n_beta)
                p.add_(force, alpha=-half_eps)
                noise = torch.stack([torch.randn(w0.shape, generator=g, device=w0.device, dtype=w0.dtype)
                                     for g in generators])
                p.add_(noise, alpha=noise_scale)
                noises.append(noise)
            if self.control_variate is not None:
                self.control_variate.step(flatten(noises, chains=True))

    def _record_all(
        self, step: int, draw: int, stacked: Params, store: MomentStore, traces: SamplerTraces, bar: Any
    ) -> None:
        """Evaluate the traced values of every chain and record them as draw ``draw``."""
        cfg = self.config
        where = f"draw {draw} (SGLD step {step})"
        x, y = self.stacked_traced_values(stacked)
        y = y.reshape(y.shape[0], -1)
        with torch.no_grad():
            squares = sum(((p - w0).double() ** 2).reshape(p.shape[0], -1).sum(dim=1)
                          for p, w0 in ((stacked[k], v) for k, v in self.anchor_params.items()))
        dist = torch.sqrt(squares).tolist()
        mean_x = x.double().mean(dim=1).tolist()
        for c in range(x.shape[0]):
            if not (math.isfinite(mean_x[c]) and math.isfinite(dist[c]) and bool(torch.isfinite(y[c]).all())):
                raise self._diverged(c, where, "a traced loss, observable or parameter is NaN/inf")
            if mean_x[c] > self.limit:
                raise self._diverged(c, where, f"the mean traced loss {mean_x[c]:.4g} exceeds "
                                     f"{cfg.divergence_factor:g} x the loss at w* ({self.limit:.4g})")
            store.add(c, draw, (x[c] - self.ref_x).cpu(), (y[c] - self.ref_y).cpu())
            traces.loss[c, draw] = mean_x[c]
            traces.observable[c, draw] = float(y[c].double().mean())
            traces.drift[c, draw] = dist[c] / self.anchor_norm
        if self.control_variate is not None:
            self.control_variate.record()
        if draw % 50 == 0:
            bar.set_postfix(loss=f"{sum(mean_x) / len(mean_x):.4g}", drift=f"{max(dist) / self.anchor_norm:.2e}")


__all__ = ["BatchedSGLDSampler"]
