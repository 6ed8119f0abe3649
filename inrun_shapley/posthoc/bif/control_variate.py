"""Control variate for the BIF covariance: a coupled Gaussian chain with a closed-form law.

Why not subtract the linearization directly. With δ = w − w*, a_i = ∇ℓ_i(w*), b_q = ∇φ_q(w*),
the linearizations a_iᵀδ and b_qᵀδ have, *under the localizing Gaussian alone*, covariance
a_iᵀb_q/γ. But the draws come from the posterior p, not from that Gaussian: under p their
covariance is a_iᵀΣ_p b_q, which is unknown (it is the very influence function we avoid
computing). Subtracting ``Ĉov(a_iᵀδ, b_qᵀδ) − a_iᵀb_q/γ`` would therefore bias the estimate, and
subtracting the sample covariance of the linearization estimated from the same draws changes
nothing (covariance is bilinear). The control variate must have a *known* mean under the process
that is actually simulated.

The coupled chain. Next to every SGLD chain runs an auxiliary chain u (one vector over the
sampled parameters, u_0 = 0 like δ_0 = 0) driven by **the same Gaussian noise ξ_t**::

    δ_{t+1} = δ_t − ε/2·(nβ·∇L_batch(w*+δ_t) + γ·δ_t) + sqrt(ε)·ξ_t        (the chain)
    u_{t+1} = u_t − ε/2·λ ⊙ u_t               + sqrt(ε)·ξ_t              (the coupled chain)

with a fixed diagonal precision λ (``"prior"``: λ_k = γ; ``"diagonal"``: λ_k = γ + nβ·D_k with D
the mean squared per-sample gradient of the traced training losses at w*, a diagonal Fisher
approximation of the Hessian of L_n, capped so that ρ_k = 1 − ε·λ_k/2 stays in [0, 1)). u is a
Gaussian AR(1) process per coordinate, mean 0, and exactly::

    Var(u_{k,t}) = v_k(t) = ε·(1 − ρ_k^{2t}) / (1 − ρ_k²)          (t SGLD steps from u_0 = 0)

Its linearized "losses" x_i = a_iᵀu and "observables" y_q = b_qᵀu therefore have the known
second moment E[x_i·y_q] = Σ_k a_ik·b_qk·v_k(t) at every step t, for any fixed a, b. Over the
N = C·T pooled draws (steps t_1..t_T in every chain)::

    Z[i, q]   = 1/N·Σ_{c,s} x_{c,s,i}·y_{c,s,q} − a_iᵀ diag(v̄) b_q,      v̄ = 1/T·Σ_s v(t_s)
    E[Z]      = 0                                      (exactly: no stationarity is assumed)
    Ĉov_cv    = Ĉov(ℓ_i, φ_q) − Z[i, q]                 (BIF_cv = −Ĉov_cv)

so E[Ĉov_cv] = E[Ĉov(ℓ_i, φ_q)]: the control variate adds **no bias** to the plain pooled
estimator (whatever finite-N, burn-in or step-size bias that one has, it keeps, and nothing more).
It reduces variance when the noise of Ĉov(ℓ_i, φ_q) and of Z move together: along directions where
λ matches the posterior precision, δ and u follow the same recursion from the same start with the
same noise, so a_iᵀδ ≈ x_i path by path and the Monte-Carlo error of that part of the covariance
is replaced by its exact value. Along directions where λ is far from the posterior precision, Z
adds noise; ``"diagonal"`` keeps λ closer than ``"prior"`` does. The coefficient of Z is fixed at
1 (an estimated optimal coefficient would add an O(1/N) bias).

Cost: the per-sample gradients A = [a_i] ``[n_x, d]`` and B = [b_q] ``[n_y, d]`` once (vmapped
Jacobians), an axpy per SGLD step, and two thin matrix products per draw.
"""

from __future__ import annotations

from typing import Optional

import torch

from inrun_shapley.errors import ConfigurationError

CONTROL_VARIATES = ("prior", "diagonal")


class CoupledGaussianCV:
    """The coupled chains u (one per SGLD chain) and the accumulated control variate Z.

    Args:
        kind: ``"prior"`` (λ = γ) or ``"diagonal"`` (λ = γ + nβ·mean_i a_i²).
        grad_x: ``[n_x, d]`` gradients of the traced training losses at w*.
        grad_y: ``[n_y, d]`` gradients of the flattened observables at w*.
        chains: C.
        step_size: ε.
        gamma: γ.
        n_beta: nβ.

    Attributes:
        precision: ``[d]`` λ, fp64.
        rho: ``[d]`` 1 − ε·λ/2, fp64, in [0, 1).
    """

    def __init__(
        self, kind: str, grad_x: torch.Tensor, grad_y: torch.Tensor, chains: int, step_size: float,
        gamma: float, n_beta: float,
    ) -> None:
        if kind not in CONTROL_VARIATES:
            raise ConfigurationError(f"control_variate must be one of {CONTROL_VARIATES} or None, got {kind!r}.")
        d = grad_x.shape[1]
        precision = torch.full((d,), float(gamma), dtype=torch.float64)
        if kind == "diagonal":
            precision = precision + n_beta * (grad_x.double() ** 2).mean(dim=0)
        # keep ρ = 1 − ελ/2 in [0, 1): any λ > 0 keeps E[Z] = 0, so the cap costs no bias
        precision = precision.clamp(max=2.0 / step_size)
        if not bool((precision > 0).all()):
            raise ConfigurationError(
                "control_variate needs gamma > 0 (the coupled chain must have a stationary law); "
                "set gamma > 0 or control_variate=None."
            )
        self.kind = kind
        self.precision = precision
        self.rho = 1.0 - step_size * precision / 2
        self.step_size = step_size
        self.grad_x = grad_x
        self.grad_y = grad_y
        self.u = torch.zeros(chains, d, dtype=grad_x.dtype, device=grad_x.device)
        self.decay = self.rho.to(grad_x.dtype).to(grad_x.device)
        self.scale = step_size ** 0.5
        self.steps = torch.zeros(chains, dtype=torch.int64)
        self.second_moment = torch.zeros(grad_x.shape[0], grad_y.shape[0], dtype=torch.float64)
        self.variance_sum = torch.zeros(d, dtype=torch.float64)
        self.n = 0

    def step(self, noise: torch.Tensor, chain: Optional[int] = None) -> None:
        """Advance the coupled chain(s) by one SGLD step with the chain's own noise.

        Args:
            noise: ``[d]`` (one chain, ``chain`` given) or ``[C, d]`` (every chain) flattened ξ_t,
                the same draw the SGLD step used, before the sqrt(ε) scale.
            chain: the chain, or None for all.
        """
        if chain is None:
            self.u.mul_(self.decay).add_(noise.to(self.u.dtype), alpha=self.scale)
            self.steps += 1
        else:
            self.u[chain].mul_(self.decay).add_(noise.to(self.u.dtype), alpha=self.scale)
            self.steps[chain] += 1

    def record(self, chain: Optional[int] = None) -> None:
        """Fold the current state of one chain (or every chain) into Z's running sums."""
        rows = [chain] if chain is not None else list(range(self.u.shape[0]))
        u = self.u[rows]
        x = (u @ self.grad_x.T).double()  # [c, n_x]
        y = (u @ self.grad_y.T).double()  # [c, n_y]
        self.second_moment += x.T @ y
        rho2 = self.rho ** 2
        for c in rows:
            t = int(self.steps[c])
            self.variance_sum += self.step_size * (1 - rho2 ** t) / (1 - rho2)
        self.n += len(rows)

    def correction(self) -> torch.Tensor:
        """Z ``[n_x, n_y]`` fp64 (mean 0); subtract it from the pooled Cov(ℓ, φ)."""
        if self.n == 0:
            raise ConfigurationError("control variate: no draw recorded.")
        mean_variance = self.variance_sum / self.n
        expected = (self.grad_x.double() * mean_variance) @ self.grad_y.double().T
        return self.second_moment / self.n - expected


def flatten(tensors: list[torch.Tensor], chains: bool) -> torch.Tensor:
    """Concatenate per-parameter tensors into ``[d]`` (or ``[C, d]`` when ``chains``)."""
    if chains:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors])


__all__ = ["CONTROL_VARIATES", "CoupledGaussianCV", "flatten"]
