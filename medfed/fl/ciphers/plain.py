"""Key setup ``none``: plaintext float64 vectors, summed in the clear. Plain FedAvg, the
baseline to compare the encrypted setups against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medfed.crypto.errors import CiphertextError
from medfed.fl.ciphers.base import AggregatorCipher, HospitalCipher
from medfed.fl.ciphers.framing import frame, unframe
from medfed.fl.ciphers.registry import register_key_setup


class PlainHospital(HospitalCipher):
    """keys "none": the update in the clear (float64). Plain FedAvg, for comparison only."""

    @classmethod
    def for_hospital(cls, workspace: str, index: int) -> PlainHospital:
        """A new plain cipher: it holds no key material, so the workspace is not read."""
        return cls()

    def encrypt(self, vector: np.ndarray) -> bytes:
        """The vector as one framed part of little-endian float64 values."""
        return frame([np.asarray(vector, dtype="<f8").ravel().tobytes()])

    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        """The aggregate's first ``length`` float64 values."""
        (part,) = unframe(aggregate, sender="aggregator", item="aggregate")
        return np.frombuffer(part, dtype="<f8")[:length].astype(np.float64)


class PlainAggregator(AggregatorCipher):
    """keys "none": checks each update is ``length`` finite float64 values and adds them."""

    name = "none"

    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        """Raise :class:`CiphertextError` unless ``blob`` is ``length`` finite float64 values."""
        parts = unframe(blob, sender=sender)
        if len(parts) != 1 or len(parts[0]) != 8 * length:
            raise CiphertextError(f"update from {sender} is not {length} float64 values")
        if not np.all(np.isfinite(np.frombuffer(parts[0], dtype="<f8"))):
            raise CiphertextError(f"update from {sender} has non-finite values")

    def add(self, blobs: Sequence[bytes]) -> bytes:
        """The element-wise sum, framed like one update."""
        total = sum(np.frombuffer(unframe(b)[0], dtype="<f8") for b in blobs)
        return frame([np.asarray(total, dtype="<f8").tobytes()])


register_key_setup("none", PlainHospital, PlainAggregator)
