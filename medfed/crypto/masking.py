"""Integer masks for the aggregator's refresh rounds, and how well they hide.

Before a key-holding hospital decrypts, the aggregator adds to each ciphertext a polynomial
``M`` whose coefficients are uniform integers on ``[-2**B, 2**B)``: the hospital sees the exact
integer coefficients of ``p + e + M`` (``p``: the encoded values, ``scale * message``; ``e``:
the CKKS noise), never a float. A coefficient ``c`` is then hidden with statistical distance
``|c| / 2**(B + 1)``, and a whole run's union bound is ``sum |c| / 2**(B + 1)`` over every
coefficient of every vector the hospital decrypted (:func:`refresh_security`, in bits).

``B`` follows from the ciphertext's level (:func:`mask_bits_for`): the sum of up to
:data:`MAX_MASK_PARTS` masks and the message stay below a quarter of the level's modulus, so the
hospital's centered lift is exact and a decryption under a foreign key (uniform modulo ``q``)
is detected. Masks come from a ChaCha20 keystream (:class:`MaskStream`, keyed from the OS
CSPRNG); a compute hands the aggregator the 32-byte key of its masks, not the masks.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

#: What a refresh round masks, in the order the key holder receives it.
MASK_KINDS = ("products", "bias")

#: Computes whose masks may add up on one vector (one part per compute and share).
MAX_MASK_PARTS = 64

#: Allowance, in bits, for ``|e|`` per coefficient: the CKKS noise and any difference between
#: the encrypted values and the plaintext twin's (tests measure it on a training run: 2^9).
NOISE_ALLOWANCE_BITS = 16


class MaskStream:
    """Uniform integers from a ChaCha20 keystream (256-bit key, 128-bit nonce).

    ``key`` (32 bytes) and ``nonce`` (16 bytes) default to fresh ones from :mod:`secrets`;
    pass a ``key`` to reproduce a stream (the nonce then defaults to zeros, so the same key
    gives the same stream). Not thread-safe (one stream per process or thread).
    """

    def __init__(self, key: bytes | None = None, nonce: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(32)
            nonce = secrets.token_bytes(16) if nonce is None else nonce
        nonce = bytes(16) if nonce is None else nonce
        if len(key) != 32 or len(nonce) != 16:
            raise ValueError("a MaskStream needs a 32-byte key and a 16-byte nonce")
        self._enc = Cipher(algorithms.ChaCha20(bytes(key), bytes(nonce)), mode=None).encryptor()

    def words(self, size: int) -> np.ndarray:
        """The next ``size`` 64-bit keystream words (unsigned)."""
        return np.frombuffer(self._enc.update(bytes(8 * size)), dtype=np.uint64)

    def integers(self, bits: int, size: int) -> np.ndarray:
        """``size`` integers uniform on ``[-2**bits, 2**bits)`` (an object array): the top
        ``bits + 1`` bits of ``ceil((bits + 1) / 64)`` keystream words each."""
        width = -(-(bits + 1) // 64)
        rows = self.words(width * size).reshape(size, width).astype(object)
        acc = np.zeros(size, dtype=object)
        for j in range(width):
            acc = (acc << 64) | rows[:, j]
        return (acc >> (64 * width - bits - 1)) - (1 << bits)


def mask_key() -> bytes:
    """A fresh 32-byte mask key from the OS CSPRNG; masks never reuse a run seed."""
    return secrets.token_bytes(32)


def draw_mask(key: bytes, bits: int, n: int) -> np.ndarray:
    """The mask polynomial of ``key``: ``n`` coefficients uniform on ``[-2**bits, 2**bits)``."""
    return MaskStream(key=key).integers(bits, n)


def mask_bits_for(modulus_bits: float) -> int:
    """``B`` for a level whose modulus has ``modulus_bits`` bits: up to :data:`MAX_MASK_PARTS`
    masks of ``2**B`` plus the message stay below ``q / 4`` (one bit kept for the message)."""
    return math.floor(modulus_bits) - 2 - int(math.log2(MAX_MASK_PARTS)) - 1


def coefficient_l1_bound(abs_slots: float, vectors: int, scale: float, n: int) -> float:
    """A bound on ``sum |p + e|`` over the coefficients of ``vectors`` plaintexts of ring degree
    ``n`` whose slot values have ``sum |z| = abs_slots`` at ``scale``.

    Each coefficient of the encoding is ``(1/n) sum_w p(w) w^-i`` over the ``n`` roots, so
    ``|p_i| <= 2 * scale * sum|z| / n`` and ``sum_i |p_i| <= 2 * scale * sum|z|``, plus ``1/2``
    per coefficient of rounding and ``2**NOISE_ALLOWANCE_BITS`` of noise.
    """
    return 2.0 * scale * abs_slots + vectors * n * (0.5 + 2.0**NOISE_ALLOWANCE_BITS)


def security_bits(l1: float, mask_bits: int) -> float:
    """``-log2`` of the union bound ``l1 / 2**(mask_bits + 1)`` (``inf`` when ``l1 <= 0``)."""
    if l1 <= 0:
        return math.inf
    return mask_bits + 1 - math.log2(l1)


def refresh_security(plain: Iterable[Mapping], sent: Iterable[Mapping]) -> dict:
    """A run's refresh security from its plaintext twin's values and what it masked.

    ``plain``: the plaintext backend's records, one per round (``abs``: the sum of ``|z|`` over
    every slot of every vector of a kind, ``vectors``: how many vectors of each kind);
    ``sent``: the encrypted backend's records (``mask_bits``, ``scale``, ``ring``: the ring
    degree, ``masked``: vectors per kind, ``masked_coefficients``). The twin runs the same
    schedule on the same data, so it must have masked as many vectors of each kind in as many
    rounds; raises ``ValueError`` otherwise. Returns ``refresh_security_bits`` (all kinds, the
    whole run), ``refresh_security_bits_by_kind`` (None for a kind never masked),
    ``refresh_masked_coefficients``, ``refresh_masked_vectors`` and ``refresh_mask_bits``.
    """
    plain, sent = list(plain), list(sent)
    if len(plain) != len(sent):
        raise ValueError(
            f"the plaintext twin ran {len(plain)} refresh rounds, the encrypted run {len(sent)}"
        )
    l1 = dict.fromkeys(MASK_KINDS, 0.0)
    vectors = dict.fromkeys(MASK_KINDS, 0)
    for step, (p, s) in enumerate(zip(plain, sent, strict=True)):
        for kind in MASK_KINDS:
            want, got = int(p["vectors"].get(kind, 0)), int(s["masked"].get(kind, 0))
            if want != got:
                raise ValueError(
                    f"round {step}: the plaintext twin masked {want} {kind} vectors, the "
                    f"encrypted run sent {got}"
                )
            abs_slots = float(p["abs"].get(kind, 0.0))
            l1[kind] += coefficient_l1_bound(abs_slots, got, float(s["scale"]), int(s["ring"]))
            vectors[kind] += got
    bits = {int(s["mask_bits"]) for s in sent}
    if len(bits) > 1:
        raise ValueError(f"the run masked with several widths: {sorted(bits)} bits")
    mask_bits = bits.pop() if bits else None

    def of(total: float, masked: int) -> float | None:
        return security_bits(total, mask_bits) if masked and mask_bits is not None else None

    return {
        "refresh_security_bits": of(sum(l1.values()), sum(vectors.values())),
        "refresh_security_bits_by_kind": {k: of(l1[k], vectors[k]) for k in MASK_KINDS},
        "refresh_masked_coefficients": sum(int(s["masked_coefficients"]) for s in sent),
        "refresh_masked_vectors": vectors,
        "refresh_mask_bits": mask_bits,
    }
