"""The masked refresh, exact in the integer coefficient domain.

The aggregator's products end low in the modulus chain. A key-holding hospital turns them into
fresh top-level ciphertexts of their per-feature sums without learning them:

1. the aggregator (or the compute that made the products) adds an integer mask polynomial
   (:mod:`medfed.crypto.masking`) to each ciphertext: :meth:`Refresh.mask`;
2. the hospital decrypts the exact integer coefficients ``p + e + M`` (no float decode), checks
   they lie in the mask range, applies the public linear map (a sum of slot rotations, i.e. of
   Galois automorphisms: exact on integers) in the top level's residues, and encrypts the
   result with the same scale: :meth:`Refresh.open_and_map`;
3. the aggregator subtracts the map of its masks: :meth:`Refresh.unmask`.

The result encrypts ``map(p + e)`` at the top level, bit for bit what a plaintext map of the
decrypted values would give, so masks may be far wider than a float could carry (for the
``fast`` preset ``2**110``, see :func:`~medfed.crypto.masking.mask_bits_for`). This is the
single-key-holder case of the multiparty refresh of Mouchet et al. (PoPETs 2021): statistical
hiding by a wide uniform mask, then re-encryption at the top level.
"""

from __future__ import annotations

import math

import numpy as np
import tenseal.sealapi as sa

from medfed.crypto.coefficients import Coefficients, add_mod, automorphism, reduce
from medfed.crypto.errors import CiphertextError
from medfed.crypto.masking import draw_mask, mask_bits_for
from medfed.crypto.seal import SealVec


class RefreshRangeError(CiphertextError):
    """Decrypted masked values outside the mask range: a foreign key or corrupt data."""


class Refresh:
    """One party's side of the refresh, on its :class:`~medfed.crypto.seal.SealEngine`."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.coeffs = Coefficients(engine)
        self.n = self.coeffs.n
        self.top = self.coeffs.primes[0]

    def mask_bits(self, level: int) -> int:
        """The mask width ``B`` for a ciphertext at ``level``."""
        return mask_bits_for(self.coeffs.modulus_bits(level))

    # -- the aggregator's side ----------------------------------------------------------------
    def mask(self, v, key: bytes):
        """``v`` plus the mask polynomial of ``key`` (a new :class:`SealVec`); returns it and
        the mask width used."""
        level = self.engine.level(v.ct)
        bits = self.mask_bits(level)
        primes = self.coeffs.primes[level]
        ntt = self.coeffs.to_ntt(reduce(draw_mask(key, bits, self.n), primes), level)
        trivial = self.coeffs.trivial_ciphertext(ntt, level, ntt=True, scale=v.ct.scale)
        out = sa.Ciphertext()
        self.engine.ev.add(v.ct, trivial, out)
        return SealVec(self.engine, out), bits

    def unmask(self, reply, keys: list[tuple[bytes, int]], unit: int, count: int):
        """``reply`` (the hospital's top-level ciphertext) less the map of the masks
        ``keys`` (``(key, bits)`` per part) summed over ``count`` rotations by ``unit``."""
        total = None
        for key, bits in keys:
            part = reduce(draw_mask(key, bits, self.n), self.top)
            total = part if total is None else add_mod(total, part, self.top)
        out = sa.Ciphertext()
        self.engine.ev.sub_plain(reply.ct, self._mapped(total, unit, count, reply.ct.scale), out)
        return SealVec(self.engine, out)

    # -- the key holder's side ----------------------------------------------------------------
    def open(self, v) -> np.ndarray:
        """The exact masked integers of ``v``, checked to lie within a quarter of the level's
        modulus (:class:`RefreshRangeError` otherwise)."""
        level = self.engine.level(v.ct)
        ints = self.coeffs.decrypt_integers(v.ct)
        limit = math.prod(self.coeffs.primes[level]) // 4
        if int(np.max(np.abs(ints))) > limit:
            raise RefreshRangeError(
                "masked values from the aggregator decrypt outside the mask range: not "
                "encrypted under this consortium's key, or corrupt."
            )
        return ints

    def open_and_map(self, v, unit: int, count: int) -> bytes:
        """The key holder's reply for one masked vector: decrypt exactly, sum ``count``
        rotations by ``unit`` in the top level's residues, encrypt (seeded) at ``v``'s scale."""
        mapped = self._mapped(reduce(self.open(v), self.top), unit, count, v.ct.scale)
        return self.engine.encrypt_plaintext_bytes(mapped)

    # -- the public linear map ----------------------------------------------------------------
    def _mapped(self, residues: np.ndarray, unit: int, count: int, scale: float) -> sa.Plaintext:
        """The map of top-level coefficient residues, as a top-level plaintext at ``scale``."""
        image = self.coeffs.to_ntt(self.replicate(residues, unit, count), 0)
        return self.coeffs.plaintext(image, 0, scale)

    def replicate(self, residues: np.ndarray, unit: int, count: int) -> np.ndarray:
        """``sum_{j < count} rot(x, j * unit)`` on top-level coefficient residues (``count`` a
        power of two: one automorphism and one addition per doubling)."""
        if count & (count - 1) or count < 1:
            raise ValueError(f"count {count} must be a power of two")
        acc, step = residues, unit
        while step < unit * count:
            element = pow(3, step, 2 * self.n)
            acc = add_mod(acc, automorphism(acc, element, self.top), self.top)
            step *= 2
        return acc
