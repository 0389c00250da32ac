"""Mode "updates"' Gaussian mechanisms: record-level differential privacy of everything the
hospitals decrypt (the statistics sum, every round's sum of weighted heads), hence of the
released head and feature map.

Neighbouring federations differ in one training record of one hospital (replace-one; the
sample counts are the same). Each hospital makes its records' contribution bounded by
construction, then adds its share of the noise before encrypting:

* **Statistics.** Every embedding is scaled to unit L2 norm (a per-record map that needs no
  other data), so one record moves ``sum x`` by at most 2 and ``sum x x^T`` (or ``sum x^2``)
  by at most 2 in Frobenius norm: :data:`STATS_SENSITIVITY` = 2 sqrt(2). The count is exact.
* **Updates.** Trained features are clipped to unit norm after the (post-processed) feature
  map, so with the bias ``|[x, 1]| <= sqrt(2)``; the L2-penalized logistic loss is then
  ``L = 1/2 + l2`` smooth and gradient descent with ``lr <= 2 / L`` is non-expansive (Hardt,
  Recht & Singer, ICML 2016, Lemma 3.6). One record moves each full-batch gradient by at most
  ``2 sqrt(2) / n_i``, so ``E`` local epochs move ``w_i`` by at most ``2 sqrt(2) E lr / n_i``
  per head and the weighted update ``n_i w_i`` by :func:`update_sensitivity`
  ``= 2 sqrt(2) E lr sqrt(heads)``, whatever ``n_i``.

Noise is distributed: each hospital adds ``N(0, (sigma * sensitivity)^2 / k)`` per value, so a
sum over at least ``k`` hospitals (:attr:`UpdatesDP.contributors`) carries the full
``N(0, (sigma * sensitivity)^2)``. ``1 + rounds`` such releases compose (:mod:`.accountant`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: L2 sensitivity of one hospital's statistics vector under replace-one of a unit-norm record.
STATS_SENSITIVITY = 2 * math.sqrt(2)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """Rows longer than ``bound`` scaled down to it, then every row divided by ``bound``."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, bound)


def update_sensitivity(local_epochs: int, lr: float, heads: int) -> float:
    """L2 sensitivity of one hospital's weighted head ``n_i w_i`` (see the module docstring)."""
    return 2 * math.sqrt(2) * local_epochs * lr * math.sqrt(heads)


def max_stable_lr(l2: float) -> float:
    """The largest step for which local gradient descent is non-expansive: ``2 / (1/2 + l2)``."""
    return 2 / (0.5 + l2)


@dataclass(frozen=True)
class UpdatesDP:
    """What each hospital is provisioned with for DP (its ``meta.json`` ``dp``)."""

    noise_multiplier: float
    contributors: int  # k: the noise is full whenever at least k hospitals are summed

    def stats_std(self) -> float:
        """This hospital's noise share per statistics value."""
        return self.noise_multiplier * STATS_SENSITIVITY / math.sqrt(self.contributors)

    def update_std(self, local_epochs: int, lr: float, heads: int) -> float:
        """This hospital's noise share per weighted-head value."""
        sensitivity = update_sensitivity(local_epochs, lr, heads)
        return self.noise_multiplier * sensitivity / math.sqrt(self.contributors)

    @staticmethod
    def noise(std: float, size: int) -> np.ndarray:
        """Gaussian noise from a generator seeded with 128 bits from the OS."""
        return np.random.default_rng(secrets.randbits(128)).normal(0.0, std, size)

    def to_dict(self) -> dict[str, Any]:
        """The ``meta.json`` entry."""
        return asdict(self)
