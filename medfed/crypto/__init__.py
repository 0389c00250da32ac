"""Homomorphic-encryption building blocks, free of Flower, Ray and torch.

CKKS parameters and presets (:mod:`~medfed.crypto.params`), TenSEAL contexts and checked
(de)serialization (:mod:`~medfed.crypto.context`), direct SEAL operations
(:mod:`~medfed.crypto.seal`), the diagonal slot layout (:mod:`~medfed.crypto.diagonal`), masks
for refresh rounds, sealed hospital-to-hospital messages (:mod:`~medfed.crypto.channel`) and
threshold CKKS on OpenFHE (:mod:`~medfed.crypto.threshold`).
"""
