"""Compiled (fused) elementwise kernels for the midpoint pass: ``kernels="compiled"``.

The list-wide ``torch._foreach_*`` form of Adam's midpoint (:mod:`~inrun_shapley.optim.adam_midpoint`)
makes 13 passes over memory per parameter; this is the same arithmetic as one
``torch.compile``-generated kernel per tensor (C++ on the CPU, Triton on CUDA), which reads
``g, m, v, θ`` once and writes ``θ_half`` and ``J`` once. It is compiled once per process and
list of shapes (seconds to tens of seconds at the first step; torch's compile cache shortens
later processes); every step after that runs the compiled code. The per-step scalars (bias
corrections, learning rate) enter as 0-d host tensors, so that a changing learning rate or step
count never recompiles. Measured on the CPU only: the CUDA path (a Triton kernel) is written and
has a test (``tests/engine/test_gpu.py``) that has not yet run on a GPU.

Where compiling fails (no C++ compiler, an unsupported build), a warning names the cause once
and the list-wide kernels are used instead: the values are the same either way. Lists of shapes
beyond torch.compile's recompile limit (8 by default: param groups, over all trackers of the
process) also take the list-wide kernels.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["adam_midpoint_fused", "fused_available"]

_COMPILED = None  # the compiled kernel, once built
_FAILED: str | None = None  # why compiling failed (then the list-wide kernels are used)
_SIGNATURES: set = set()  # the lists of (shape, dtype, device) compiled for so far


def _adam_midpoint_body(g_half: list[Tensor], m: list[Tensor], v: list[Tensor], theta: list[Tensor],
                        out_theta: list[Tensor], out_jac: list[Tensor], c_v: Tensor, c_m: Tensor, eps_a: Tensor,
                        floor: Tensor, keep: Tensor, step_scale: Tensor, j_v: Tensor, j_mg: Tensor,
                        j_u: Tensor) -> None:
    """The arithmetic of ``adam_midpoint._midpoint_foreach`` (same names, same folded scalars, each
    a 0-d host tensor: its value is an argument of the kernel, so a new value never recompiles)."""
    for i in range(len(g_half)):
        gi = g_half[i]
        u = torch.sqrt(v[i] + c_v * gi * gi).clamp_min(floor)
        d = u + eps_a
        out_theta[i].copy_(theta[i] * keep + step_scale * (m[i] + c_m * gi) / d)
        out_jac[i].copy_((j_v * v[i] + j_mg * m[i] * gi + j_u * u) / (d * d * u))


def _kernel():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_adam_midpoint_body, dynamic=False, fullgraph=True)
    return _COMPILED


def _recompile_limit() -> int:
    import torch._dynamo.config as dynamo_config

    return int(getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", 8)))


def fused_available() -> str | None:
    """None while the compiled kernels are usable, else why they are not (a compile failed)."""
    return _FAILED


def adam_midpoint_fused(g_half: list[Tensor], m: list[Tensor], v: list[Tensor], theta: list[Tensor],
                        out_theta: list[Tensor], out_jac: list[Tensor], scalars: list[float]) -> bool:
    """Run the compiled midpoint kernel, writing ``out_theta`` and ``out_jac`` (shaped like
    ``g_half``, contiguous); False (and nothing written) where compiling is not possible here,
    with one warning per process saying why.

    Args:
        g_half, m, v, theta: per parameter ``g'`` (the ``½`` may be folded into the scalars), the
            moments before the step and ``θ_t``, one dtype.
        out_theta, out_jac: where ``θ_t + Δ(g/2)`` and ``dΔ/dg`` go.
        scalars: the nine folded scalars of :func:`~inrun_shapley.optim.adam_midpoint._midpoint_foreach`
            (``c_v, c_m, eps/α, floor, 1-lr·λ, -lr·β1/(b1·α), j_v, j_mg, j_u``).
    """
    global _FAILED
    if _FAILED is not None:
        return False
    signature = tuple((t.shape, t.dtype, t.device) for t in g_half)
    if signature not in _SIGNATURES:
        # past torch.compile's recompile limit the body would run uncompiled, slower than the
        # list-wide kernels: param groups beyond it take those
        if len(_SIGNATURES) >= _recompile_limit():
            return False
        _SIGNATURES.add(signature)
    # 0-d tensors on the host whatever the tensors' device: torch.compile passes a 0-d CPU tensor
    # input to a CUDA kernel by value, where a copy to the device would wait for it every step
    sc = torch.tensor(scalars, dtype=g_half[0].dtype).unbind(0)
    try:
        _kernel()(g_half, m, v, theta, out_theta, out_jac, *sc)
    except Exception as exc:  # a missing compiler, an unsupported build: fall back, say so once
        _FAILED = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"inrun-shapley: kernels='compiled' could not compile the midpoint kernel here ({_FAILED}); "
                      "using the list-wide kernels instead (same values, slower)", stacklevel=3)
        return False
    return True
