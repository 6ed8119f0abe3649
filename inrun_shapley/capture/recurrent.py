"""Capture rule for ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: the generic JVP rule, told where the
samples are in each output, and replayed on the native kernels.

A recurrent layer returns ``(out, h_n)`` (LSTM: ``(out, (h_n, c_n))``) with the samples in
dimension 0 of ``out`` when ``batch_first`` (else dimension 1) and always in dimension 1 of the
hidden states ``[num_layers × directions, B, H]``: each output is summed per sample along its own
sample dimension. Samples never interact inside the layer, so the forward-mode JVP in the
direction ``M`` dotted with each sample's output gradients is exact.

The fused kernels (oneDNN on CPU, used for float32 LSTMs; cuDNN on GPU) have no forward-mode
derivative, so the replay runs on PyTorch's native implementation of the same recurrence. The
replay restores the random state of the call, so inter-layer dropout draws the same masks.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from inrun_shapley.capture.jvp import JVPRule
from inrun_shapley.capture.registry import register_rule
from inrun_shapley.errors import UnsupportedModuleError


def _backend_off(backend):
    """``backend.flags(enabled=False)`` leaving every other setting of the backend as it is."""
    others = {k: None for k in inspect.signature(backend.flags).parameters if k != "enabled"}
    return backend.flags(enabled=False, **others)


@contextmanager
def native_recurrent_kernels() -> Iterator[None]:
    """oneDNN and cuDNN off inside the block (restored after); nothing else changed."""
    with ExitStack() as stack:
        for backend in (torch.backends.mkldnn, torch.backends.cudnn):
            if backend.is_available():
                stack.enter_context(_backend_off(backend))
        yield


@register_rule(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(JVPRule):
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (any layers, directions, ``proj_size``, dropout) on
    padded batches: ``[B, T, in]`` with ``batch_first``, else ``[T, B, in]``."""

    kind = "recurrent-jvp"
    broadcastable = False  # the initial hidden state would have to be expanded with the input

    def rows(self, module: nn.Module, args: tuple, kwargs: dict) -> int | None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, PackedSequence):
            raise UnsupportedModuleError(
                f"{type(module).__name__} called on a PackedSequence: its rows are time steps of "
                "several samples interleaved, not samples. Pass the padded batch instead "
                "(padding positions then need a loss mask), or exclude=[<this module's name>]"
            )
        if not isinstance(x, Tensor) or x.dim() != 3:  # unbatched [T, in]: no sample dimension
            return None
        return x.shape[0 if module.batch_first else 1]

    def output_sample_dims(self, module: nn.Module, outputs: list[Tensor]) -> list[int]:
        # out, then h_n (and c_n): [num_layers * directions, B, H]
        return [0 if module.batch_first else 1] + [1] * (len(outputs) - 1)

    def replay_context(self):
        return native_recurrent_kernels()
