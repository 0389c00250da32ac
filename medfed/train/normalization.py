"""The shared normalization rule every hospital applies (both modes).

Hospitals securely sum :func:`stats_vector` of their raw embeddings, decrypt the total, derive
the global mean and standard deviation (:func:`normalization_from_stats`) and apply
:func:`normalize`. numpy only: importable without TenSEAL, torch or Flower.
"""

from __future__ import annotations

import numpy as np


def stats_vector(features: np.ndarray) -> np.ndarray:
    """``[sum x (d), sum x^2 (d), n]``: what the shared normalization needs, summed securely."""
    return np.concatenate([features.sum(0), (features**2).sum(0), [features.shape[0]]])


def normalization_from_stats(total: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Global mean and standard deviation from the decrypted sum of every hospital's stats."""
    n = total[2 * d]
    if not n >= 1:
        raise ValueError("the securely summed sample count is not positive")
    mean = total[:d] / n
    var = np.maximum(total[d : 2 * d] / n - mean**2, 0.0)
    return mean, np.sqrt(var) + 1e-6


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: float) -> np.ndarray:
    """The rule every hospital shares: standardize, then scale to unit expected norm."""
    return scale * (x - mean) / std / np.sqrt(x.shape[1])
