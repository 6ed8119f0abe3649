"""Capture rule for ``nn.Linear`` (any number of leading dimensions: sequences included)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun_shapley.capture.registry import Capture, CaptureRule, project, register_rule, up


def bilinear_rows(a: Tensor, weight_dirs: Tensor, b: Tensor) -> Tensor:
    """``sum_t b[n,t]^T M[q] a[n,t]`` for every row n and direction q.

    Args:
        a: ``[N, T, d_in]`` layer inputs.
        weight_dirs: ``[Q, d_out, d_in]`` directions for the weight.
        b: ``[N, T, d_out]`` gradients of the loss with respect to the layer outputs.

    Returns:
        ``[N, Q]``. Cost: one forward of the layer per direction (the cheaper side is mapped).
    """
    n, t, d_in = a.shape
    q, d_out, _ = weight_dirs.shape
    if d_in <= d_out:  # map b back through M (size d_in), then dot with a
        mapped = b @ weight_dirs.permute(1, 2, 0).reshape(d_out, d_in * q)
        mapped = mapped.view(n, t, d_in, q)
        return (mapped * a.unsqueeze(-1)).sum(dim=(1, 2))
    mapped = a @ weight_dirs.reshape(q * d_out, d_in).T  # forward with weight M: [N, T, Q*d_out]
    return (mapped.view(n, t, q, d_out) * b.unsqueeze(2)).sum(dim=(1, 3))


@register_rule(nn.Linear)
class LinearRule(CaptureRule):
    """``y = a W^T + bias``: weight contribution ``sum_t b_t a_t^T``, bias ``sum_t b_t``."""

    kind = "linear"

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        a = up(capture.args[0])
        b = up(capture.grad_output)
        n = a.shape[0]
        a = a.reshape(n, -1, a.shape[-1])
        b = b.reshape(n, -1, b.shape[-1])
        w, wb = directions.get("weight"), directions.get("bias")
        if w is not None and w.shape[0] == 1 and a.shape[-1] >= b.shape[-1]:
            # one direction, output side no wider than the input: the layer's own forward with
            # weight M and bias M_b (bias folded into the GEMM), dotted with b row by row
            y = F.linear(a, w[0], None if wb is None else wb[0])  # [N, T, d_out]
            return torch.linalg.vecdot(y.reshape(n, -1), b.reshape(n, -1)).unsqueeze(1)
        total = 0
        if w is not None:
            total = total + bilinear_rows(a, w, b)
        if wb is not None:
            total = total + project(b.sum(dim=1), wb)
        return total
