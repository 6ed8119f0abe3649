"""The step's declared host reads (DESIGN §7 "Host reads").

A training step with the tracker reads values on the host a constant number of times: the
optimizer's step counts (one read, on the host already unless the optimizer is fused or
capturable), the step's packed values and flags (one transfer), and the sample ids (host data).
Each such read is wrapped in :func:`declared_read`, so that ``torch.cuda.set_sync_debug_mode("error")``
around a step finds every other synchronization (the GPU tests do this).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["declared_read"]


@contextmanager
def declared_read() -> Iterator[None]:
    """Run one intended device-to-host read with CUDA's sync debug mode off, then restore it
    (no effect without an initialized CUDA)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    if mode == 0:
        yield
        return
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
