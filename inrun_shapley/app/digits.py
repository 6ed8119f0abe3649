"""The digits data and MLP shared by the demo and the benchmarks: load, shuffle, split, flip.

The data is scikit-learn's ``load_digits``: 1,797 grey 8×8 images (64 features, intensities
0..16) in 10 classes, shipped with scikit-learn (nothing is downloaded). Every user draws its
splits through :func:`load_digits_splits` and its label noise through :func:`flip_labels`, so a
recorded figure depends on one definition of "the digits split with seed s".

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> (x_tr, y_tr), (x_te, y_te) = load_digits_splits((1000, None), rng, scale="unit")
    >>> tuple(x_tr.shape), tuple(x_te.shape), x_tr.dtype, y_tr.dtype
    ((1000, 64), (797, 64), torch.float32, torch.int64)
    >>> y_noisy, flipped = flip_labels(y_tr, 0.2, rng)
    >>> int(flipped.sum()), bool((y_noisy != y_tr).numpy()[flipped].all())
    (200, True)
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from inrun_shapley.errors import ConfigurationError

SCALES = ("unit", "standardize", "standardize_f64")
N_DIGITS = 1797
N_CLASSES = 10

_Labels = TypeVar("_Labels", np.ndarray, Tensor)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator | None:
    return np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng


def load_digits_splits(
    sizes: Sequence[int | None],
    rng: np.random.Generator | int | None = None,
    *,
    scale: str = "unit",
) -> list[tuple[Tensor, Tensor]]:
    """The digits shuffled once, scaled, and cut into consecutive splits.

    Args:
        sizes: rows of each split, taken in order from the shuffled images; the last entry may
            be None for "the rest". Their sum must not exceed 1,797.
        rng: a numpy ``Generator`` (or an int seed for a new one) whose ``permutation(1797)``
            shuffles the rows. Exactly one draw is taken, so a caller that goes on drawing from
            the same generator (label flips, subset draws) gets the same numbers as before the
            split was shared. None keeps scikit-learn's order.
        scale: ``"unit"``: intensities / 16, in [0, 1]. ``"standardize"``: per-pixel z-scores
            with the first split's mean and standard deviation, the deviation floored at one
            intensity level so a pixel (nearly) constant in that split cannot turn another
            image's ink there into a feature of size 1e6; float32 arithmetic (the demo).
            ``"standardize_f64"``: per-pixel z-scores from the first split computed in float64,
            a zero deviation replaced by 1, then cast to float32 (the LDS harness).

    Returns:
        One ``(x, y)`` per split: ``x [n_k, 64]`` float32, ``y [n_k]`` int64 class labels.

    Raises:
        ConfigurationError: unknown ``scale``, a negative size, a None before the last split,
            or more rows asked than there are images.
    """
    from inrun_shapley.extras import require

    load_digits = require("sklearn.datasets", "demo", "the digits data (scikit-learn's bundled copy)").load_digits

    if scale not in SCALES:
        raise ConfigurationError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    sizes = list(sizes)
    if not sizes or any(s is None for s in sizes[:-1]) or any(s is not None and s < 0 for s in sizes):
        raise ConfigurationError(f"sizes must be non-negative ints, only the last may be None; got {sizes}")
    fixed = sum(s for s in sizes if s is not None)
    if fixed > N_DIGITS:
        raise ConfigurationError(f"the splits ask for {fixed} rows; the digits have {N_DIGITS}")
    if sizes[-1] is None:
        sizes[-1] = N_DIGITS - fixed

    images, labels = load_digits(return_X_y=True)
    generator = _rng(rng)
    if generator is not None:
        order = generator.permutation(len(images))
        images, labels = images[order], labels[order]
    labels = labels.astype(np.int64)
    n_first = sizes[0]
    if scale == "standardize_f64":
        x = images.astype(np.float64)
        sd = x[:n_first].std(0)
        sd[sd == 0] = 1.0
        x = ((x - x[:n_first].mean(0)) / sd).astype(np.float32)
    else:
        x = images.astype(np.float32)
        if scale == "unit":
            x = x / 16.0
        else:
            x = (x - x[:n_first].mean(0)) / np.maximum(x[:n_first].std(0), 1.0)
    splits, start = [], 0
    for size in sizes:
        splits.append((torch.from_numpy(x[start : start + size]), torch.from_numpy(labels[start : start + size])))
        start += size
    return splits


def flip_labels(labels: _Labels, fraction: float, rng: np.random.Generator | int) -> tuple[_Labels, np.ndarray]:
    """Moves ``round(fraction · n)`` randomly chosen labels to a uniformly drawn *other* class.

    Args:
        labels: ``[n]`` integer class labels in ``0..9`` (numpy array or tensor; not modified).
        fraction: share of labels to flip, in [0, 1].
        rng: numpy ``Generator`` (or an int seed): one ``choice`` of the flipped rows, then one
            ``integers(1, 10)`` shift per flipped row.

    Returns:
        ``(noisy labels, flipped)``: the labels with the flips applied (same type as ``labels``)
        and the ``[n]`` bool mask of the flipped rows.

    Raises:
        ConfigurationError: ``fraction`` outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"the flipped fraction must be in [0, 1]; got {fraction}")
    generator = _rng(rng)
    as_tensor = isinstance(labels, Tensor)
    y = labels.numpy().copy() if as_tensor else np.array(labels, copy=True)
    n = len(y)
    flipped = np.zeros(n, dtype=bool)
    flipped[generator.choice(n, size=int(round(fraction * n)), replace=False)] = True
    y[flipped] = (y[flipped] + generator.integers(1, N_CLASSES, size=int(flipped.sum()))) % N_CLASSES
    return (torch.from_numpy(y) if as_tensor else y), flipped


def mlp(
    hidden: Sequence[int],
    *,
    d_in: int = 64,
    n_out: int = N_CLASSES,
    activation: str = "relu",
    seed: int | None = None,
) -> nn.Sequential:
    """A fully connected classifier ``d_in → hidden[0] → … → n_out`` as an ``nn.Sequential``.

    Layers alternate ``Linear`` and the activation (indices 0, 2, 4, …: the ``state_dict`` keys
    are ``"0.weight"``, ``"2.weight"``, …); no hidden layer gives a logistic regression.

    Args:
        hidden: widths of the hidden layers (``()`` for none).
        d_in: input features (64 for the digits).
        n_out: output logits.
        activation: ``"relu"`` or ``"tanh"``.
        seed: initialize under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so
            the global generator is left as it was; None draws from the global generator.

    Raises:
        ConfigurationError: unknown ``activation``.
    """
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ConfigurationError(f"activation must be 'relu' or 'tanh'; got {activation!r}")

    def build() -> nn.Sequential:
        dims = [d_in, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), acts[activation]()]
        return nn.Sequential(*layers, nn.Linear(dims[-1], n_out))

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


__all__ = ["SCALES", "flip_labels", "load_digits_splits", "mlp"]
