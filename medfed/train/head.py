"""One training loop for the classification head, plaintext or encrypted.

The loop is written once against a :class:`SlotBackend`. :class:`PlainBackend` runs it on numpy
slot vectors (the plaintext reference); the encrypted backend runs the very same arithmetic on
CKKS ciphertexts. ``accuracy - plaintext_accuracy`` therefore measures encryption alone.

One step of full-batch gradient descent on the (approximated) logistic loss::

    z      = sum_j W[j] * X[b][j]                 (per block b; all classes at once)
    r      = c * (sigmoid_approx(z) - Y[b])        (c = lr / n_padded)
    P[j]  += r * X[b][j]
    W[j]  -= replicate(segment_sums(P[j]))         (the backend's "sum" round)

The segment sums are the only step that needs the secret key holder: in the encrypted backend
the aggregator masks ``P`` with fresh randomness, a hospital decrypts, sums and re-encrypts, and
the aggregator removes the masks. That round also refreshes the weights to a fresh level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from medfed.crypto.packing import SlotLayout, replicate, segment_sums, unreplicate
from medfed.train.poly import SigmoidApprox, scaled_residual


class SlotBackend(Protocol):
    """What the loop needs from a backend; vectors support ``+ - *`` with vectors and floats."""

    def zeros(self) -> object: ...

    def sum_round(self, products: Sequence[object], step: int) -> list[object]:
        """Return ``replicate(segment_sums(p))`` for every product vector."""


@dataclass(frozen=True)
class HeadSchedule:
    """What the aggregator trains: epochs of full-batch gradient descent."""

    epochs: int
    lr: float
    approx: SigmoidApprox

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (0 < self.lr < 1e4) or not np.isfinite(self.lr):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")


def gradient_products(
    weights: Sequence[object],
    x_blocks: Sequence[Sequence[object]],
    y_blocks: Sequence[object],
    approx: SigmoidApprox,
    scale: float,
) -> list[object]:
    """Per-slot gradient contributions ``P[j]``, summed over blocks (not over slots)."""
    products: list[object] = [None] * len(weights)
    for xs, y in zip(x_blocks, y_blocks, strict=True):
        z = weights[0] * xs[0]
        for w, x in zip(weights[1:], xs[1:], strict=True):
            z = z + w * x
        r = scaled_residual(z, y, approx, scale)
        for j, x in enumerate(xs):
            # Fresh operand on the left: TenSEAL mod-switches a higher-level *right* operand
            # in place, which would silently drain the stored features' levels.
            p = x * r
            products[j] = p if products[j] is None else products[j] + p
    return products


def train_head(
    backend: SlotBackend,
    x_blocks: Sequence[Sequence[object]],
    y_blocks: Sequence[object],
    layout: SlotLayout,
    schedule: HeadSchedule,
    on_step: Callable[[int], None] | None = None,
) -> list[object]:
    """Run the schedule; returns the weight vectors (one per feature, bias last)."""
    scale = schedule.lr / layout.n_padded
    weights = [backend.zeros() for _ in range(layout.n_columns)]
    for step in range(schedule.epochs):
        products = gradient_products(weights, x_blocks, y_blocks, schedule.approx, scale)
        updates = backend.sum_round(products, step)
        weights = [w - u for w, u in zip(weights, updates, strict=True)]
        if on_step is not None:
            on_step(step)
    return weights


class PlainBackend:
    """numpy slot vectors: the plaintext reference with the encrypted path's exact arithmetic."""

    def __init__(self, layout: SlotLayout) -> None:
        self.layout = layout

    def zeros(self) -> np.ndarray:
        return np.zeros(self.layout.slots)

    def sum_round(self, products: Sequence[np.ndarray], step: int) -> list[np.ndarray]:
        return [replicate(segment_sums(p, self.layout), self.layout) for p in products]


def weights_matrix(weight_vectors: Sequence[np.ndarray], layout: SlotLayout) -> np.ndarray:
    """Decrypted/plain weight vectors -> ``(d + 1, n_segments)`` matrix (bias row last)."""
    return np.stack([unreplicate(np.asarray(v), layout) for v in weight_vectors])


def predict(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Class predictions from a ``(d + 1, n_segments)`` head (binary when one segment)."""
    scores = np.asarray(features, dtype=np.float64) @ weights[:-1] + weights[-1]
    if weights.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return np.argmax(scores, axis=1).astype(np.int64)


def accuracy(weights: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict(weights, features) == np.asarray(labels).reshape(-1)))
