"""Additive masks for the aggregator's refresh rounds, and how well they hide.

The aggregator adds fresh uniform noise to every slot before a hospital decrypts, so the
hospital sees only masked values (statistical hiding: a slot value of magnitude ``v`` is hidden
behind a mask uniform on ``[-2**mask_bits, 2**mask_bits]``: statistical distance
``|v| / 2**(mask_bits + 1)`` per slot, which adds up over every slot a hospital sees).
The aggregator removes the masks' image under the same linear map from the hospital's reply.

Masks come from a ChaCha20 keystream (:class:`MaskStream`, a cryptographic generator keyed
from the OS CSPRNG). :func:`refresh_security` turns the masked values' magnitudes (measured by
the plaintext twin of a run) into the run's union bound, in bits.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

#: What a refresh round masks, in the order the key holder receives it.
MASK_KINDS = ("products", "bias", "weights")


class MaskStream:
    """Uniform floats from a ChaCha20 keystream (256-bit key, 128-bit nonce).

    ``key`` (32 bytes) and ``nonce`` (16 bytes) default to fresh ones from :mod:`secrets`;
    pass a ``key`` only to reproduce a stream (tests): the nonce then defaults to zeros, so
    the same key gives the same stream. Not thread-safe (one stream per process or thread).
    """

    def __init__(self, key: bytes | None = None, nonce: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(32)
            nonce = secrets.token_bytes(16) if nonce is None else nonce
        nonce = bytes(16) if nonce is None else nonce
        if len(key) != 32 or len(nonce) != 16:
            raise ValueError("a MaskStream needs a 32-byte key and a 16-byte nonce")
        self._enc = Cipher(algorithms.ChaCha20(bytes(key), bytes(nonce)), mode=None).encryptor()
        self._zeros = b""
        self._out = bytearray()

    def _keystream(self, n_bytes: int) -> memoryview:
        """The next ``n_bytes`` of keystream (a view of a reused buffer)."""
        if len(self._zeros) < n_bytes:
            self._zeros = bytes(n_bytes)
            self._out = bytearray(n_bytes + 63)  # update_into wants block_size - 1 spare
        written = self._enc.update_into(memoryview(self._zeros)[:n_bytes], self._out)
        return memoryview(self._out)[:written]

    def uniform(self, bound: float, size: int) -> np.ndarray:
        """``size`` floats uniform on ``(-bound, bound)``: 53 random bits each (the top bits
        of a 64-bit keystream word), symmetric about zero."""
        words = np.frombuffer(self._keystream(8 * size), dtype=np.int64)
        np.right_shift(words, 11, out=words)  # signed 53-bit integers in [-2**52, 2**52)
        out = words.astype(np.float64)
        out += 0.5
        out *= bound * 2.0**-52
        return out


def mask_rng() -> MaskStream:
    """A fresh mask stream keyed from the OS CSPRNG; masks must never reuse a run seed."""
    return MaskStream()


def draw_mask(rng: MaskStream, slots: int, mask_bits: int) -> np.ndarray:
    """Uniform mask on ``(-2**mask_bits, 2**mask_bits)`` for one slot vector."""
    return rng.uniform(float(2**mask_bits), slots)


def security_bits(abs_sum: float, mask_bits: int) -> float:
    """``-log2`` of the union bound ``abs_sum / 2**(mask_bits + 1)`` on the statistical
    distance of every masked slot together (``inf`` when nothing nonzero was masked)."""
    if abs_sum <= 0:
        return math.inf
    return mask_bits + 1 - math.log2(abs_sum)


def refresh_security(plain: Iterable[Mapping], sent: Iterable[Mapping]) -> dict:
    """A run's refresh security from its plaintext twin's values and what it masked.

    ``plain``: the plaintext backend's records, one per round (``abs``: the sum of ``|v|``
    over every slot of every vector of a kind, ``vectors``: how many vectors of each kind);
    ``sent``: the encrypted backend's records (``mask_bits``, ``masked``: vectors per kind,
    ``masked_slots``). The twin runs the same schedule on the same data, so it must have
    masked exactly as many vectors of each kind in as many rounds; raises ``ValueError``
    otherwise. Returns ``refresh_security_bits`` (all kinds, the whole run),
    ``refresh_security_bits_by_kind`` (None for a kind never masked), ``refresh_masked_slots``,
    ``refresh_masked_vectors`` and ``refresh_mask_bits``.
    """
    plain, sent = list(plain), list(sent)
    if len(plain) != len(sent):
        raise ValueError(
            f"the plaintext twin ran {len(plain)} refresh rounds, the encrypted run {len(sent)}"
        )
    abs_sum = dict.fromkeys(MASK_KINDS, 0.0)
    vectors = dict.fromkeys(MASK_KINDS, 0)
    for step, (p, s) in enumerate(zip(plain, sent, strict=True)):
        for kind in MASK_KINDS:
            want, got = int(p["vectors"].get(kind, 0)), int(s["masked"].get(kind, 0))
            if want != got:
                raise ValueError(
                    f"round {step}: the plaintext twin masked {want} {kind} vectors, the "
                    f"encrypted run sent {got}"
                )
            abs_sum[kind] += float(p["abs"].get(kind, 0.0))
            vectors[kind] += got
    bits = {int(s["mask_bits"]) for s in sent}
    if len(bits) > 1:
        raise ValueError(f"the run masked with several widths: {sorted(bits)} bits")
    mask_bits = bits.pop() if bits else None

    def of(total: float, masked: int) -> float | None:
        return security_bits(total, mask_bits) if masked and mask_bits is not None else None

    return {
        "refresh_security_bits": of(sum(abs_sum.values()), sum(vectors.values())),
        "refresh_security_bits_by_kind": {k: of(abs_sum[k], vectors[k]) for k in MASK_KINDS},
        "refresh_masked_slots": sum(int(s["masked_slots"]) for s in sent),
        "refresh_masked_vectors": vectors,
        "refresh_mask_bits": mask_bits,
    }
