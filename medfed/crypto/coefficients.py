"""Exact access to the integer coefficients of SEAL's CKKS ciphertexts and plaintexts.

A CKKS plaintext at level ``l`` is an integer polynomial modulo ``q_l`` (the product of the
level's primes), stored in RNS form (one residue row per prime) and, in CKKS, in NTT form.
The refresh (:mod:`medfed.crypto.refresh`) masks and re-encrypts plaintexts exactly, in this
integer domain, with no floating-point decode in between. This module moves residues in and
out of SEAL objects:

* reading: a plaintext's residues through the binding's element access; a ciphertext's through
  its uncompressed serialization (:mod:`medfed.crypto.uncompressed`);
* NTT and inverse NTT: SEAL's own transforms, applied to a two-component ciphertext whose
  second component is zero (a plaintext in a ciphertext's clothes);
* writing: SEAL's serialization format without compression (header, members, residues),
  loaded with SEAL's ``load``, which checks every residue against the context.

Integer helpers: :func:`crt_lift` (residues to centered Python integers), :func:`reduce`
(integers to residues) and :func:`automorphism` (a slot rotation as a signed permutation of
coefficients).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import tenseal.sealapi as sa

from medfed.crypto.errors import KeyMaterialError
from medfed.crypto.uncompressed import frame, save_uncompressed


class Coefficients:
    """Residue-level I/O for one :class:`~medfed.crypto.seal.SealEngine` (any party)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.n = engine.slots * 2
        self.primes = engine.primes  # per level (0 = top): that level's primes

    def modulus_bits(self, level: int) -> float:
        """``log2 q_l``: the bits of the level's coefficient modulus."""
        return sum(math.log2(q) for q in self.primes[level])

    # -- reading ------------------------------------------------------------------------------
    def plaintext_residues(self, pt: sa.Plaintext, level: int) -> np.ndarray:
        """A plaintext's residues ``(primes, N)`` as stored (NTT form for CKKS)."""
        arr = pt.dyn_array()
        count = len(self.primes[level]) * self.n
        if arr.size() != count:
            raise ValueError(f"a level-{level} plaintext has {count} words, this one {arr.size()}")
        return np.fromiter((arr[i] for i in range(count)), np.uint64, count).reshape(-1, self.n)

    def ciphertext_residues(self, ct: sa.Ciphertext) -> np.ndarray:
        """A ciphertext's residues ``(size, primes, N)`` as stored."""
        shape = (ct.size(), ct.coeff_modulus_size(), ct.poly_modulus_degree())
        count = math.prod(shape)
        raw = save_uncompressed(ct)
        if raw is not None:
            return np.frombuffer(raw[-8 * count :], dtype=np.uint64).reshape(shape).copy()
        arr = ct.dyn_array()
        return np.fromiter((arr[i] for i in range(count)), np.uint64, count).reshape(shape)

    # -- writing ------------------------------------------------------------------------------
    def _members(self, level: int, ntt: bool, size: int, scale: float) -> bytes:
        parms = struct.pack("<4Q", *self.engine.parms_ids[level])
        moduli = len(self.primes[level])
        return parms + bytes([int(ntt)]) + struct.pack("<3QdQ", size, self.n, moduli, scale, 1)

    @staticmethod
    def _framed(members: bytes, words: np.ndarray) -> bytes:
        return frame(members, np.ascontiguousarray(words, dtype=np.uint64).tobytes(), words.size)

    def trivial_ciphertext(
        self, residues: np.ndarray, level: int, *, ntt: bool, scale: float, second: int = 0
    ) -> sa.Ciphertext:
        """The ciphertext ``(residues, second)``; with ``second = 0`` it decrypts to
        ``residues`` under any key. SEAL refuses to transform a ciphertext whose second
        component is zero ("transparent"), so the transforms pass ``second = 1``."""
        polys = np.zeros((2, *residues.shape), dtype=np.uint64)
        polys[0] = residues
        polys[1] = second
        ct = sa.Ciphertext()
        self.engine.load_serialized(ct, self._framed(self._members(level, ntt, 2, scale), polys))
        return ct

    def plaintext(self, ntt_residues: np.ndarray, level: int, scale: float) -> sa.Plaintext:
        """A CKKS plaintext (NTT form) at ``level`` with the given residues and scale."""
        parms = struct.pack("<4Q", *self.engine.parms_ids[level])
        members = parms + struct.pack("<Qd", ntt_residues.size, scale)
        pt = sa.Plaintext()
        self.engine.load_serialized(pt, self._framed(members, ntt_residues))
        return pt

    # -- transforms ---------------------------------------------------------------------------
    def from_ntt(self, residues: np.ndarray, level: int) -> np.ndarray:
        """Coefficient form of NTT-form residues ``(primes, N)`` (SEAL's inverse NTT)."""
        ct = self.trivial_ciphertext(residues, level, ntt=True, scale=1.0, second=1)
        self.engine.ev.transform_from_ntt_inplace(ct)
        return self.ciphertext_residues(ct)[0]

    def to_ntt(self, residues: np.ndarray, level: int) -> np.ndarray:
        """NTT form of coefficient-form residues ``(primes, N)`` (SEAL's NTT)."""
        ct = self.trivial_ciphertext(residues, level, ntt=False, scale=1.0, second=1)
        self.engine.ev.transform_to_ntt_inplace(ct)
        return self.ciphertext_residues(ct)[0]

    def decrypt_integers(self, ct: sa.Ciphertext) -> np.ndarray:
        """The exact integer coefficients (centered, Python ints) a ciphertext decrypts to:
        ``scale * message + noise``, with no rounding anywhere (needs the secret key)."""
        engine = self.engine
        if engine.decryptor is None:
            raise KeyMaterialError("decryption needs a hospital's secret key")
        level = engine.level(ct)
        pt = sa.Plaintext()
        engine.counts["decrypt", level] += 1
        engine.decryptor.decrypt(ct, pt)
        coeffs = self.from_ntt(self.plaintext_residues(pt, level), level)
        return crt_lift(coeffs, self.primes[level])

    def encode_integers(self, values: np.ndarray, level: int, scale: float) -> sa.Plaintext:
        """The plaintext whose coefficients are the integers ``values`` (object or int array)."""
        primes = self.primes[level]
        return self.plaintext(self.to_ntt(reduce(values, primes), level), level, scale)


def crt_lift(residues: np.ndarray, primes: list[int]) -> np.ndarray:
    """Centered integers (object array) from residues ``(primes, N)``: each in ``(-q/2, q/2]``."""
    q = math.prod(primes)
    acc = np.zeros(residues.shape[1], dtype=object)
    for row, p in zip(residues, primes, strict=True):
        rest = q // p
        acc += row.astype(object) * (rest * pow(rest, -1, p) % q)
    acc %= q
    return np.where(acc > q // 2, acc - q, acc)


def reduce(values: np.ndarray, primes: list[int]) -> np.ndarray:
    """Residues ``(primes, N)`` of integers ``values`` (any sign)."""
    ints = np.asarray(values, dtype=object)
    return np.stack([(ints % p).astype(np.uint64) for p in primes])


def automorphism(residues: np.ndarray, element: int, primes: list[int]) -> np.ndarray:
    """``p(X) -> p(X^element)`` on coefficient-form residues: SEAL's Galois automorphism, a
    slot rotation when ``element = 3^step mod 2N`` (a signed permutation of coefficients)."""
    n = residues.shape[1]
    target = (np.arange(n, dtype=np.int64) * element) % (2 * n)
    flip = target >= n
    out = np.empty_like(residues)
    for j, p in enumerate(primes):
        row = residues[j]
        negated = np.where(row == 0, row, np.uint64(p) - row)
        out[j, target % n] = np.where(flip, negated, row)
    return out


def add_mod(a: np.ndarray, b: np.ndarray, primes: list[int]) -> np.ndarray:
    """``a + b`` residue-wise (primes below 2^62, so the sum fits in 64 bits)."""
    mods = np.asarray(primes, dtype=np.uint64)[:, None]
    s = a + b
    return np.where(s >= mods, s - mods, s)
