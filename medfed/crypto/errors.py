"""Key-material and ciphertext errors, importable without TenSEAL.

:mod:`medfed.crypto.context` re-exports both; they live here so that code paths without
TenSEAL (the Python 3.10 OpenFHE environment) can name them.
"""

from __future__ import annotations

from medfed.errors import MedfedError


class CiphertextError(MedfedError, ValueError):
    """A ciphertext that cannot be used: malformed, foreign, wrong size or wrong count."""


class KeyMaterialError(MedfedError, ValueError):
    """Key material in the wrong place (e.g. a secret key sent to the aggregator)."""
