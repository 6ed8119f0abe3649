"""Crash-safe file writes shared by the value log and the trajectory recording.

Every data file is written to a temporary name, fsynced and moved into place with ``os.replace``;
the caller writes its manifest (the commit point) last, listing each file's size and CRC-32, so a
crash mid-write leaves the previous complete state readable.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` atomically: temp file, fsync, ``os.replace``.

    Returns:
        The file's manifest entry: ``{"file": name, "bytes": size, "crc32": checksum}``.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "bytes": len(data), "crc32": zlib.crc32(data) & 0xFFFFFFFF}


def npy_bytes(array: np.ndarray) -> bytes:
    """One array serialized as ``.npy`` (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays serialized as ``.npz``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
