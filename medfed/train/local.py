"""Mode "updates": a hospital's local training and the sample-weighted FedAvg arithmetic.

Each hospital trains the head in plaintext on its own embeddings under the shared feature map,
starting from the current global head: full-batch gradient descent on the L2-penalized logistic
loss with the exact sigmoid (one-vs-rest for multi-class), ``local_epochs`` steps of size
``lr``. It then sends ``Enc([n_i * w_i, n_i])`` (:func:`weighted_update`): the sample weight
travels inside the ciphertext, so the aggregator, which only adds ciphertexts, never learns
``n_i``. Hospitals decrypt the sum and divide (:func:`fedavg_from_sum`). numpy only.
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.packing import label_targets


def n_heads(n_classes: int) -> int:
    """One logistic head for a binary task, one per class (one-vs-rest) otherwise."""
    return 1 if n_classes == 2 else n_classes


def head_shape(n_features: int, n_classes: int) -> tuple[int, int]:
    """``(d + 1, heads)``: weights and the bias row, as :func:`medfed.train.head.predict` takes."""
    return n_features + 1, n_heads(n_classes)


def update_length(n_features: int, n_classes: int) -> int:
    """Slots of one update vector: the flattened head and the sample count."""
    rows, cols = head_shape(n_features, n_classes)
    return rows * cols + 1


def _problem(w0, features, labels, n_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features with a ones column, 0/1 targets per head, a float copy of ``w0``)."""
    x = np.asarray(features, dtype=np.float64)
    x1 = np.hstack([x, np.ones((x.shape[0], 1))])
    y = label_targets(np.asarray(labels).reshape(-1), n_classes)
    w = np.array(w0, dtype=np.float64, copy=True)
    if w.shape != (x1.shape[1], y.shape[1]):
        raise ValueError(f"head has shape {w.shape}, expected {(x1.shape[1], y.shape[1])}")
    return x1, y, w


def _residual(x1: np.ndarray, w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The exact sigmoid of the scores minus the targets, ``(n, heads)``."""
    return 1.0 / (1.0 + np.exp(-np.clip(x1 @ w, -500.0, 500.0))) - y


def train_local(
    w0: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    epochs: int,
    lr: float,
    l2: float = 0.0,
) -> np.ndarray:
    """``epochs`` full-batch gradient steps with the exact sigmoid, starting from ``w0``; the
    weights (not the bias row) carry an L2 penalty ``l2 / 2 * |w|^2``."""
    x1, y, w = _problem(w0, features, labels, n_classes)
    if not len(x1):
        return w
    for _ in range(epochs):
        grad = x1.T @ _residual(x1, w, y) / x1.shape[0]
        grad[:-1] += l2 * w[:-1]
        w -= lr * grad
    return w


def train_local_dp(
    w0: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    epochs: int,
    lr: float,
    l2: float,
    clip: float,
    noise_std: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """:func:`train_local` as differentially private full-batch gradient descent (DP-SGD with
    every sample in every step, Abadi et al. 2016): each sample's gradient (all heads) is
    clipped to L2 norm ``clip``, the clipped gradients are summed, ``N(0, noise_std^2)`` is
    added to each value of the sum, and the step uses that noisy sum over ``n``."""
    x1, y, w = _problem(w0, features, labels, n_classes)
    n = x1.shape[0]
    if not n:
        return w
    for _ in range(epochs):
        residual = _residual(x1, w, y)  # (n, heads)
        # per-sample gradient x1_i residual_i^T has Frobenius norm |x1_i| |residual_i|
        norms = np.linalg.norm(x1, axis=1) * np.linalg.norm(residual, axis=1)
        scale = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
        total = x1.T @ (residual * scale[:, None])
        total += rng.normal(0.0, noise_std, size=total.shape)
        grad = total / n
        grad[:-1] += l2 * w[:-1]
        w -= lr * grad
    return w


def weighted_update(w: np.ndarray, n: int) -> np.ndarray:
    """``[n * w (flattened, bias row included), n]``: what a hospital encrypts."""
    return np.concatenate([n * np.asarray(w, dtype=np.float64).ravel(), [float(n)]])


def fedavg_from_sum(total: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """``sum(n_i w_i) / sum(n_i)`` from a decrypted sum of :func:`weighted_update` vectors.

    The sample count is an integer, so the decrypted count is rounded; a value far from an
    integer means the decryption is wrong (wrong key, too much noise) and is refused.
    """
    size = shape[0] * shape[1]
    total = np.asarray(total, dtype=np.float64)
    if total.shape[0] < size + 1:
        raise ValueError(f"the aggregate has {total.shape[0]} values, expected {size + 1}")
    count = float(total[size])
    n = round(count)
    if not np.isfinite(count) or n < 1 or abs(count - n) > 0.25:
        raise ValueError(
            f"the decrypted sample count {count:.3f} is not a positive integer: the aggregate "
            "did not decrypt correctly"
        )
    w = total[:size].reshape(shape) / n
    if not np.all(np.isfinite(w)) or np.abs(w).max(initial=0.0) > 1e6:
        raise ValueError("the decrypted head is not finite or absurdly large")
    return w, n


def fedavg(heads: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Plain sample-weighted FedAvg (the reference for the encrypted sum)."""
    total = sum(weighted_update(w, n) for w, n in zip(heads, counts, strict=True))
    return fedavg_from_sum(total, np.asarray(heads[0]).shape)[0]
