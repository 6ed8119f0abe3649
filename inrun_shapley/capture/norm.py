"""Capture rules for normalization layers with an elementwise affine: LayerNorm, RMSNorm,
GroupNorm; and the refusal of BatchNorm in training mode (it couples the samples of a batch)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun_shapley.capture.registry import Capture, CaptureRule, project, register_rule, up


def _affine_dot(x_hat: Tensor, b: Tensor, directions: Mapping[str, Tensor], n_affine_dims: int) -> Tensor:
    """Dot products for ``y = x_hat * weight + bias`` with the affine on the last dims of x."""
    n = b.shape[0]
    affine_shape = b.shape[b.dim() - n_affine_dims :]
    b_rows = b.reshape(n, -1, *affine_shape)
    total = 0
    if "weight" in directions:
        total = total + project((b_rows * x_hat.reshape(b_rows.shape)).sum(1), directions["weight"])
    if "bias" in directions:
        total = total + project(b_rows.sum(1), directions["bias"])
    return total


class _LastDimsNormRule(CaptureRule):
    """Normalization over the trailing ``normalized_shape`` dims, then ``x̂ * weight (+ bias)``:
    weight contribution ``sum_positions b ⊙ x̂``. Subclasses say how ``x̂`` is computed."""

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_with(self, module: nn.Module, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """The layer's own forward with affine ``weight``/``bias`` (None: left out)."""
        y = self.normalize(module, x)
        if weight is not None:
            y = y * weight
        return y if bias is None else y + bias

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        x, b = up(capture.args[0]), up(capture.grad_output)
        w, wb = directions.get("weight"), directions.get("bias")
        if (w is None or w.shape[0] == 1) and (wb is None or wb.shape[0] == 1):
            # one direction: the layer's forward with weight M_w and bias M_b, dotted with b
            y = self.forward_with(module, x, None if w is None else w[0], None if wb is None else wb[0])
            n = b.shape[0]
            return torch.linalg.vecdot(y.reshape(n, -1), b.reshape(n, -1)).unsqueeze(1)
        return _affine_dot(self.normalize(module, x), b, directions, len(module.normalized_shape))


@register_rule(nn.LayerNorm)
class LayerNormRule(_LastDimsNormRule):
    """``x̂ = (x - mean) / sqrt(var + eps)`` over the normalized dims."""

    kind = "layernorm"

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def forward_with(self, module: nn.Module, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


@register_rule(nn.RMSNorm)
class RMSNormRule(_LastDimsNormRule):
    """``x̂ = x / rms(x)`` over the normalized dims."""

    kind = "rmsnorm"

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


def _channel_affine_dot(x_hat: Tensor, b: Tensor, directions: Mapping[str, Tensor]) -> Tensor:
    """Dot products for a per-channel affine on ``[N, C, *spatial]`` (``x̂``, ``b`` same shape)."""
    n, c = b.shape[0], b.shape[1]
    x_hat, b = x_hat.reshape(n, c, -1), b.reshape(n, c, -1)
    total = 0
    if "weight" in directions:
        total = total + project((b * x_hat).sum(-1), directions["weight"])
    if "bias" in directions:
        total = total + project(b.sum(-1), directions["bias"])
    return total


@register_rule(nn.GroupNorm)
class GroupNormRule(CaptureRule):
    """Per-channel affine on ``[N, C, *spatial]``: weight contribution ``sum_spatial b ⊙ x̂``."""

    kind = "groupnorm"

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        x_hat = F.group_norm(up(capture.args[0]), module.num_groups, None, None, module.eps)
        return _channel_affine_dot(x_hat, up(capture.grad_output), directions)


BATCH_STATISTICS = (
    "BatchNorm in training mode couples the samples of a batch (it normalizes with the batch's "
    "statistics), so every layer's per-sample values would be approximate, whether or not the "
    "BatchNorm itself has trainable weights; put it in eval mode (running statistics: "
    "module.eval()), replace it with GroupNorm/LayerNorm, or pass strict=False to accept "
    "approximate values (with a warning)"
)


def uses_batch_statistics(module: nn.Module) -> bool:
    """A BatchNorm that normalizes with the current batch's statistics (training mode, or no
    running statistics kept)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(CaptureRule):
    """BatchNorm in training mode normalizes with statistics of the whole batch, so one sample's
    gradient depends on every other sample: there is no per-sample contribution to attribute.
    In eval mode (running statistics) it is an ordinary per-sample affine map."""

    kind = "batchnorm"

    def check(self, module: nn.Module) -> str | None:
        return BATCH_STATISTICS if uses_batch_statistics(module) else None

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        x = up(capture.args[0])
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        mean, var = up(module.running_mean).view(shape), up(module.running_var).view(shape)
        return _channel_affine_dot((x - mean) / (var + module.eps).sqrt(), up(capture.grad_output), directions)
