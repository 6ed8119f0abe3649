"""Optional dependencies: imported where used, with an error naming the extra to install.

The core install is torch, numpy, lightning, accelerate and tqdm. Plots (matplotlib), the demo
(scikit-learn's bundled digits), pandas tables and Hugging Face ``datasets`` / Parquet export
are extras: ``pip install 'inrun-shapley[plots]'``, ``[demo]``, ``[pandas]``, ``[datasets]``
(``[dev]`` installs them all).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from inrun_shapley.errors import MissingExtraError

# the distribution that provides each optional module, when its name differs
PACKAGES = {"sklearn": "scikit-learn", "pyarrow": "pyarrow", "matplotlib": "matplotlib"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise naming the extra that installs it.

    Args:
        module: the module to import (``"matplotlib.figure"``, ``"sklearn.datasets"``...).
        extra: the extra of inrun-shapley that installs it (``"plots"``, ``"demo"``...).
        what: what needs it, for the message.

    Raises:
        MissingExtraError: (an ``ImportError``) the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{what} needs {PACKAGES.get(top, top)!r}, which is not installed: pip install 'inrun-shapley[{extra}]'"
        ) from exc


__all__ = ["PACKAGES", "require"]
