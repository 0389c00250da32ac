"""Key setup ``threshold``: OpenFHE multiparty CKKS (:mod:`medfed.crypto.threshold`).

A joint public key, key shares made by the hospitals, Shamir t-of-n recovery; partial
decryptions travel sealed hospital-to-hospital. The hospital's side is in
:mod:`.hospital`, the aggregator's in :mod:`.aggregator`; this module registers the pair.
"""

from __future__ import annotations

from medfed.fl.ciphers.registry import register_key_setup
from medfed.fl.ciphers.threshold.aggregator import ThresholdAggregatorCipher
from medfed.fl.ciphers.threshold.hospital import (
    _THRESHOLD_PARTIES,
    ThresholdHospital,
    forget_threshold_parties,
)

__all__ = [
    "_THRESHOLD_PARTIES",
    "ThresholdAggregatorCipher",
    "ThresholdHospital",
    "forget_threshold_parties",
]

register_key_setup("threshold", ThresholdHospital, ThresholdAggregatorCipher)
