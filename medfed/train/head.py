"""Shared pieces of head training: the schedule, prediction and accuracy.

The training loop itself is :mod:`medfed.train.diagonal` (one loop for the plaintext
reference and the encrypted path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfed.train.poly import SigmoidApprox


@dataclass(frozen=True)
class HeadSchedule:
    """What the aggregator trains: epochs of full-batch gradient descent with an L2 penalty.

    One epoch: ``w <- (1 - lr * l2) w - lr * X^T r / n_padded`` and
    ``bias <- bias - lr * sum(r) / n_padded`` (the bias is penalized like the weights only
    with ``penalize_bias``, which differential privacy needs:
    :mod:`medfed.privacy.sensitivity`).
    """

    epochs: int
    lr: float
    approx: SigmoidApprox
    l2: float = 0.0
    penalize_bias: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (0 < self.lr < 1e4) or not np.isfinite(self.lr):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")
        if not (0 <= self.decay < 1) or not np.isfinite(self.l2):
            raise ValueError(f"lr * l2 must be in [0, 1), got {self.decay}")

    @property
    def decay(self) -> float:
        """The weights' shrink per epoch from the L2 penalty: ``lr * l2``."""
        return self.lr * self.l2


def head_scores(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Raw scores ``(n, heads)`` of a ``(d + 1, heads)`` head (weights, then the bias row):
    what :func:`predict` thresholds (binary: score > 0) or takes the argmax of."""
    w = np.asarray(weights, dtype=np.float64)
    x = np.asarray(features, dtype=np.float64).reshape(-1, w.shape[0] - 1)
    return x @ w[:-1] + w[-1]


def predict(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Class predictions from a ``(d + 1, n_segments)`` head (binary when one segment)."""
    scores = head_scores(weights, features)
    if weights.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return np.argmax(scores, axis=1).astype(np.int64)


def accuracy(weights: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``labels`` that :func:`predict` gets right with this head."""
    return float(np.mean(predict(weights, features) == np.asarray(labels).reshape(-1)))
