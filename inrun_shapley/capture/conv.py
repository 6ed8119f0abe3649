"""Capture rule for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun_shapley.capture.registry import Capture, CaptureRule, project, register_rule, up

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_with_weight(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's own convolution (stride, padding, dilation, groups, padding mode), bias-free."""
    dims = x.dim() - 2
    conv = _CONV_FN[dims]
    padding = module.padding
    if module.padding_mode != "zeros":
        if isinstance(padding, str):  # 'valid' needs no padding; 'same' with a non-zero mode
            padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
        pad = []
        for p in reversed(padding):
            pad += [p, p]
        x = F.pad(x, pad, mode=module.padding_mode)
        padding = 0
    return conv(x, weight, None, module.stride, padding, module.dilation, module.groups)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(CaptureRule):
    """``<c_n^W, M> = sum(b_n * conv(a_n, M))``; bias: ``sum_spatial b_n . M_b``."""

    kind = "conv"

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        x = up(capture.args[0])
        b = up(capture.grad_output)
        n = x.shape[0]
        total = 0
        if "weight" in directions:
            m = directions["weight"]  # [Q, C_out, C_in/groups, *k]
            q, c_out = m.shape[0], m.shape[1]
            if module.groups == 1:
                y = _conv_with_weight(module, x, m.reshape(q * c_out, *m.shape[2:]))
                y = y.view(n, q, c_out, -1)
                total = total + (y * b.reshape(n, 1, c_out, -1)).sum(dim=(2, 3))
            else:  # stacking directions would mix the channel groups: one conv per direction
                cols = [(_conv_with_weight(module, x, m[i]) * b).reshape(n, -1).sum(1) for i in range(q)]
                total = total + torch.stack(cols, dim=1)
        if "bias" in directions:
            total = total + project(b.reshape(n, b.shape[1], -1).sum(-1), directions["bias"])
        return total
