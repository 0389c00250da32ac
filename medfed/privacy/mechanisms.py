"""The hospitals' Gaussian mechanisms: record-level differential privacy of everything the
hospitals decrypt, hence of the released head and its feature map.

Neighbouring federations differ in one training record of one hospital (replace-one; the
sample counts are the same). Each record's contribution is bounded by construction:

* **Statistics** (one release, both modes). Every embedding is scaled to unit L2 norm (a
  per-record map that needs no other data), so one record moves ``sum x`` by at most 2 and
  ``sum x x^T`` (or ``sum x^2``) by at most 2 in Frobenius norm: :data:`STATS_SENSITIVITY` =
  2 sqrt(2); the count is exact. The noise is distributed: each hospital adds
  ``N(0, (sigma * 2 sqrt(2))^2 / k)`` per value before encrypting, so a sum over at least
  ``k`` hospitals (:attr:`HospitalDP.contributors`) carries the full noise.
* **Mode "updates", local training** (``local_epochs`` steps per round, per hospital).
  Differentially private full-batch gradient descent
  (:func:`medfed.train.local.train_local_dp`): every sample's gradient is clipped to
  :attr:`HospitalDP.clip`, so one record moves the summed gradient by at most ``2 clip``, and
  the hospital adds ``N(0, (sigma * 2 clip)^2)`` to it each step. The weighted heads a
  hospital encrypts, their sum and the released head are post-processing. A record's privacy
  loss composes over ``1 + rounds * local_epochs`` Gaussian mechanisms of noise multiplier
  ``sigma`` (:mod:`.accountant`).
* **Mode "embeddings", the trained head** (one release). Hospitals clip every mapped feature
  row to :attr:`HospitalDP.clip`; the aggregator adds Gaussian noise of the head's
  sensitivity (:mod:`.sensitivity`) inside the final head's ciphertexts. Two Gaussian
  mechanisms in all.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: L2 sensitivity of one hospital's statistics vector under replace-one of a unit-norm record.
STATS_SENSITIVITY = 2 * math.sqrt(2)


def secure_rng() -> np.random.Generator:
    """A numpy generator seeded with 128 bits from the OS (``secrets``), for DP noise."""
    return np.random.default_rng(secrets.randbits(128))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def releases(rounds: int, local_epochs: int) -> int:
    """Mode "updates": Gaussian mechanisms one record goes through: the statistics, then every
    local step."""
    return 1 + rounds * local_epochs


@dataclass(frozen=True)
class HospitalDP:
    """What each hospital is provisioned with for DP (its ``meta.json`` ``dp``)."""

    noise_multiplier: float
    contributors: int  # k: the statistics' noise is full whenever at least k hospitals add up
    clip: float  # updates: per-sample gradient norm bound; embeddings: feature row norm bound
    steps: int = 0  # updates: the local steps the accounting covers (more are refused)

    def stats_std(self) -> float:
        """This hospital's noise share per statistics value."""
        return self.noise_multiplier * STATS_SENSITIVITY / math.sqrt(self.contributors)

    def step_std(self) -> float:
        """The noise per value of a local step's summed gradient (replace-one: 2 clip)."""
        return self.noise_multiplier * 2 * self.clip

    @staticmethod
    def rng() -> np.random.Generator:
        """A generator seeded with 128 bits from the OS, for the noise."""
        return secure_rng()

    def noise(self, std: float, size: int) -> np.ndarray:
        """Gaussian noise of ``std`` from a fresh :meth:`rng`."""
        return self.rng().normal(0.0, std, size)

    def to_dict(self) -> dict[str, Any]:
        """The ``meta.json`` entry."""
        return asdict(self)
