"""What the ``inrun-shapley`` subcommands share: the usage error and reading/writing id files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


class UsageError(Exception):
    """A command-line argument is wrong; the message names the flag and what to pass instead."""


def read_ids(path: str, flag: str) -> "np.ndarray":
    """Integers (ids or labels) from a ``.npy`` file or a text file with one integer per line.

    Args:
        path: the file.
        flag: the option that named it (``--labels``), for the error message.

    Raises:
        UsageError: the file is missing or holds something other than integers.
    """
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {p}: no such file")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            arr = np.loadtxt(p, dtype=np.int64, ndmin=1)
    except ValueError as exc:
        raise UsageError(f"{flag} {p}: cannot read integers ({exc})") from exc
    return np.asarray(arr).ravel()


def write_ids(path: str, ids: "np.ndarray") -> Path:
    """Write ids as ``.npy`` (by suffix) or as text, one id a line; returns the path."""
    import numpy as np

    p = Path(path)
    if p.suffix == ".npy":
        np.save(p, ids.astype(np.int64))
    else:
        p.write_text("".join(f"{int(i)}\n" for i in ids))
    return p
