"""The sinks a tracker was given are closed by it: on ``tracker.close()`` and at interpreter exit.

A value log writer passed as ``ShapleyTracker(..., sink=ShapleyLogWriter(path))`` commits its
pending steps and releases its lock when closed; a script that never closes anything still
leaves a complete log. Sinks are held weakly: one the program dropped is not kept alive.
"""

from __future__ import annotations

import atexit
import warnings
import weakref

_SINKS_AT_EXIT: "weakref.WeakSet" = weakref.WeakSet()


def close_at_exit(sink) -> None:
    """Close ``sink`` at interpreter exit unless :func:`close_sink` closed it before."""
    _SINKS_AT_EXIT.add(sink)


def close_sink(sink) -> None:
    """Close (else flush) ``sink``; forget it for the exit handler. None is ignored."""
    if sink is None:
        return
    _SINKS_AT_EXIT.discard(sink)
    close = getattr(sink, "close", None) or getattr(sink, "flush", None)
    if close is not None:
        close()


@atexit.register
def _close_sinks_at_exit() -> None:
    for sink in list(_SINKS_AT_EXIT):
        try:
            close_sink(sink)
        except Exception as exc:  # pragma: no cover - report, never mask the exit
            warnings.warn(f"inrun-shapley: closing {sink!r} at exit failed: {exc}", RuntimeWarning)


__all__ = ["close_at_exit", "close_sink"]
