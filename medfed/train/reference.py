"""Exact logistic regression (true sigmoid, one-vs-rest): the unapproximated yardstick."""

from __future__ import annotations

import numpy as np

from medfed.crypto.packing import label_targets


def train_exact_logreg(
    features: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int, lr: float
) -> np.ndarray:
    """Full-batch gradient descent with the exact sigmoid; returns ``(d + 1, n_segments)``."""
    x = np.asarray(features, dtype=np.float64)
    x1 = np.hstack([x, np.ones((x.shape[0], 1))])
    y = label_targets(labels, n_classes)
    w = np.zeros((x1.shape[1], y.shape[1]))
    for _ in range(epochs):
        p = 1.0 / (1.0 + np.exp(-(x1 @ w)))
        w -= lr * x1.T @ (p - y) / x1.shape[0]
    return w
