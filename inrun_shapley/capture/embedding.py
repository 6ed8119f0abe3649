"""Capture rule for ``nn.Embedding``."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from inrun_shapley.capture.registry import Capture, CaptureRule, register_rule, up


@register_rule(nn.Embedding)
class EmbeddingRule(CaptureRule):
    """Row ``n``'s weight contribution is ``b_n`` scattered onto the looked-up rows, so the dot
    product with ``M`` is ``sum_t b_{n,t} . M[idx_{n,t}]`` (positions at ``padding_idx`` get no
    gradient and count zero)."""

    kind = "embedding"

    def check(self, module: nn.Module) -> str | None:
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True scales each row's gradient by its frequency in the whole "
                "batch, which couples samples; construct the Embedding with scale_grad_by_freq=False"
            )
        return None

    def dot(self, module: nn.Module, capture: Capture, directions: Mapping[str, Tensor], theta=None) -> Tensor:
        idx = capture.args[0]
        b = up(capture.grad_output)
        n = idx.shape[0]
        idx = idx.reshape(n, -1)
        b = b.reshape(n, idx.shape[1], -1)
        m = directions["weight"]  # [Q, V, D]
        gathered = m[:, idx]  # [Q, N, T, D]
        per = (gathered * b.unsqueeze(0)).sum(-1)  # [Q, N, T]
        if module.padding_idx is not None:
            per = per.masked_fill((idx == module.padding_idx).unsqueeze(0), 0.0)
        return per.sum(-1).T
