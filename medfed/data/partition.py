"""Seeded partitions of a dataset among simulated hospitals.

``"iid"`` shuffles and splits evenly; ``"dirichlet"`` is the label-skew partition of
Hsu et al. (2019), "Measuring the effects of non-identical data distribution for federated
visual classification": for every class, the share of its samples given to each hospital is
drawn from ``Dirichlet(alpha)``; small ``alpha`` gives strongly skewed hospitals.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from medfed.errors import MedfedError

__all__ = ["SCHEMES", "PartitionError", "label_histogram", "partition_indices"]

SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
MAX_DIRICHLET_TRIES = 100


class PartitionError(MedfedError, ValueError):
    """A partition request is invalid or cannot be satisfied; the message says how to fix it."""


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise PartitionError(
            f"labels must have shape (N,) or (N, 1), got {arr.shape}; pass one class per sample"
        )
    return arr


def partition_indices(
    labels: np.ndarray,
    n_parts: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` among ``n_parts`` hospitals.

    Returns ``n_parts`` sorted ``int64`` index arrays that are disjoint and together cover every
    sample, each holding at least ``min_size`` samples. The result depends only on the inputs
    and ``seed``. ``alpha`` (the Dirichlet concentration) is used by ``"dirichlet"`` only.
    Raises :class:`PartitionError` for invalid or unsatisfiable requests.
    """
    y = _as_labels(labels)
    n = int(y.shape[0])
    if scheme not in SCHEMES:
        raise PartitionError(
            f"unknown partition scheme {scheme!r}; valid schemes are {', '.join(SCHEMES)}"
        )
    if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise PartitionError(
            f"n_parts must be an integer >= 1 (number of hospitals), got {n_parts}"
        )
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise PartitionError(f"min_size must be an integer >= 0, got {min_size}")
    real = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not (real and math.isfinite(alpha) and alpha > 0):
        raise PartitionError(
            f"alpha must be a finite number > 0, got {alpha}; typical values are 0.1 (strong "
            "label skew) to 100 (close to iid)"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PartitionError(f"seed must be a non-negative integer, got {seed}")
    n_parts, min_size = int(n_parts), int(min_size)
    if n_parts * min_size > n:
        raise PartitionError(
            f"cannot split {n} samples among {n_parts} hospitals with at least {min_size} each; "
            f"use fewer hospitals (at most {n // max(min_size, 1)}), a smaller minimum, or more "
            "data"
        )

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_parts)
        return [np.sort(p).astype(np.int64) for p in parts]

    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    for _ in range(MAX_DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(n_parts, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * idx.shape[0]).astype(np.int64)
            for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
                bucket.append(chunk)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(p.shape[0] for p in parts) >= min_size:
            return parts
    raise PartitionError(
        f"could not draw a Dirichlet(alpha={alpha}) partition of {n} samples among {n_parts} "
        f"hospitals with at least {min_size} samples each in {MAX_DIRICHLET_TRIES} tries; use a "
        "larger alpha (e.g. 1.0), fewer hospitals, or the 'iid' scheme"
    )


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Return an ``(n_parts, n_classes)`` int64 array of per-hospital class counts."""
    y = _as_labels(labels)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise PartitionError(
            f"labels must lie in 0..{n_classes - 1} for n_classes={n_classes}, found "
            f"{y.min()}..{y.max()}; pass the dataset's n_classes"
        )
    hist = np.zeros((len(parts), n_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        hist[i] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=n_classes)
    return hist
