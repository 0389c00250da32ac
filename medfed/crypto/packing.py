"""Sample-count padding and label targets shared by every slot layout (pure numpy).

Hospitals announce only a number of *buckets* (``ceil(n / bucket)``); the aggregator assigns
each a contiguous range of ``buckets * bucket`` sample positions, so only bucket counts leak.
The slot layout itself lives in :mod:`medfed.crypto.diagonal`.
"""

from __future__ import annotations

import math

import numpy as np

from medfed.errors import MedfedError


class LayoutError(MedfedError, ValueError):
    """A slot layout that cannot hold the data, or data that does not fit a layout."""


def n_buckets(n_samples: int, bucket: int) -> int:
    """What a hospital announces instead of its sample count."""
    return math.ceil(n_samples / bucket)


def label_targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, heads) 0/1 targets: the label itself for binary tasks, one-hot otherwise."""
    raw = np.asarray(labels)
    if raw.size and (
        not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0 or raw.max() >= n_classes
    ):
        raise LayoutError(
            f"labels must be integer class indices in 0..{n_classes - 1}; fix this hospital's "
            "labels (or the run's class count) and rejoin."
        )
    labels = raw.astype(np.int64)
    if n_classes == 2:
        return labels.reshape(-1, 1).astype(np.float64)
    return np.eye(n_classes, dtype=np.float64)[labels]
