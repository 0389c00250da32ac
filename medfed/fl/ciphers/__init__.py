"""Update ciphers for mode "updates": the key setup as a pluggable layer under one FedAvg.

Privacy is a layer (like Flower's SecAgg+ strategy wrapper paired with a client mod): the FedAvg
strategy and the hospital app (:mod:`medfed.fl.updates`) are written once against two small
interfaces (:mod:`.base`), and :data:`UPDATE_CIPHERS` (:mod:`.registry`) maps each key setup
to its pair:

* :class:`HospitalCipher` (inside a hospital): ``encrypt(vector) -> bytes``; the decrypt flow
  ``partials(...)`` (collective setups only) and ``decrypt(aggregate, record, length)``; and
  ``setup(step, record)`` for the key-setup messages.
* :class:`AggregatorCipher` (the aggregator): ``add(list[bytes]) -> bytes``, ``check`` of one
  contribution, ``setup`` (key-setup rounds), and ``decrypt_material``: what each hospital
  needs besides the aggregate to decrypt it (threshold: a round of sealed partial
  decryptions, with Shamir recovery of dropped hospitals' key shares).

Key setups, one module each, each registering its pair with
:func:`~medfed.fl.ciphers.registry.register_key_setup` when imported below:

* ``none`` (:mod:`.plain`): plaintext float64 vectors, summed in the clear. Plain FedAvg,
  the baseline.
* ``shared`` (:mod:`.shared`): one TenSEAL CKKS key provisioned to every hospital (as in mode
  "embeddings"); the aggregator holds the public context only.
* ``threshold`` (:mod:`.threshold`): OpenFHE multiparty CKKS (:mod:`medfed.crypto.threshold`):
  a joint public key, key shares made by the hospitals, Shamir t-of-n recovery; partial
  decryptions travel sealed hospital-to-hospital, between channel bundles that each hospital
  signs with its pinned key (:mod:`.threshold.endorse`). A hospital stores its threshold state
  encrypted at rest after every step (:mod:`.threshold.at_rest`); any process serving it
  reloads it, so threshold runs work on every backend.

A vector longer than one ciphertext's slots is split over several ciphertexts; a
contribution is one framed blob (:func:`frame`, :mod:`.framing`) either way. TenSEAL and
OpenFHE are imported only by the setups that need them, when used (the threshold path runs
where TenSEAL is absent).
"""

from __future__ import annotations

# Importing .plain, .shared and .threshold registers key setups none, shared and threshold.
from medfed.fl.ciphers.base import AggregatorCipher, Exchange, HospitalCipher
from medfed.fl.ciphers.framing import MAX_PARTS, chunk_sizes, frame, unframe
from medfed.fl.ciphers.plain import PlainAggregator, PlainHospital
from medfed.fl.ciphers.registry import (
    UPDATE_CIPHERS,
    aggregator_cipher,
    hospital_cipher,
    key_setup,
    register_key_setup,
)
from medfed.fl.ciphers.shared import SharedKeyAggregator, SharedKeyHospital
from medfed.fl.ciphers.threshold import (
    _THRESHOLD_PARTIES,
    ThresholdAggregatorCipher,
    ThresholdHospital,
    forget_threshold_parties,
)

__all__ = [
    "MAX_PARTS",
    "UPDATE_CIPHERS",
    "_THRESHOLD_PARTIES",
    "AggregatorCipher",
    "Exchange",
    "HospitalCipher",
    "PlainAggregator",
    "PlainHospital",
    "SharedKeyAggregator",
    "SharedKeyHospital",
    "ThresholdAggregatorCipher",
    "ThresholdHospital",
    "aggregator_cipher",
    "chunk_sizes",
    "forget_threshold_parties",
    "frame",
    "hospital_cipher",
    "key_setup",
    "register_key_setup",
    "unframe",
]
