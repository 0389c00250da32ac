"""CKKS parameters: one validated object, named presets, nothing scattered.

Every number that decides security or precision lives in :class:`CKKSParams`. Validation
follows the Homomorphic Encryption Standard (Albrecht et al., 2018, table for 128-bit classical
security, ternary secrets): the total coefficient-modulus bit count ``log Q`` must not exceed
the bound for the ring size. SEAL enforces the same bound again when a context is built.

The chain is ``[q0, refresh primes.., scale primes.., special]``: the training circuit rescales
the scale primes away one per level; ``q0`` and the refresh primes are what is left when the
products reach the masked refresh (:mod:`medfed.crypto.refresh`), and their product bounds the
masks' width, so it must exceed the scale by :data:`REFRESH_HEADROOM_BITS`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field

from medfed.errors import MedfedError

#: Largest total coefficient modulus (bits) for 128-bit classical security, by ring size N.
MAX_LOG_Q_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: Bits the modulus left at the refresh must hold above the scale, even after every rescale:
#: 40 bits of statistical security for the run, room for the message, up to 2^15 of summed
#: |values| and 64 masks (:func:`medfed.crypto.masking.mask_bits_for`).
REFRESH_HEADROOM_BITS = 64


class UnsafeParametersError(MedfedError, ValueError):
    """CKKS parameters that are insecure, inconsistent, or unusable for medfed's circuits."""


@dataclass(frozen=True)
class CKKSParams:
    """A complete CKKS parameter set.

    Args:
        poly_modulus_degree: ring dimension N (slots = N / 2).
        coeff_mod_bit_sizes: bit sizes of the modulus chain ``[q0, refresh.., scale.., special]``:
            the trailing data primes equal ``scale_bits`` (each rescale keeps the scale stable);
            the primes between ``q0`` and them (at least ``scale_bits`` each) are never rescaled
            away and give the refresh its room.
        scale_bits: log2 of the encoding scale.
        security_bits: target security level; only 128 is supported.
        name: the preset name, for records.
        notes: a free-text description (not compared, not in :meth:`to_dict`).
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    security_bits: int = 128
    name: str = "custom"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        validate(self)

    @property
    def slots(self) -> int:
        """Number of CKKS slots (N / 2)."""
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplicative depth: the trailing data primes of the scale's size (rescales)."""
        data = self.coeff_mod_bit_sizes[1:-1]
        n = 0
        while n < len(data) and data[len(data) - 1 - n] == self.scale_bits:
            n += 1
        return n

    @property
    def refresh_primes(self) -> tuple[int, ...]:
        """Bit sizes of the primes between ``q0`` and the scale primes."""
        return self.coeff_mod_bit_sizes[1 : len(self.coeff_mod_bit_sizes) - 1 - self.depth]

    @property
    def log_q(self) -> int:
        """Total coefficient-modulus bits (what the security bound limits)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        """The CKKS encoding scale, ``2 ** scale_bits``."""
        return float(2**self.scale_bits)

    def refresh_modulus_bits(self, rescales: int | None = None) -> int:
        """A lower bound on ``log2`` of the modulus left after ``rescales`` rescales (default:
        all of them): a prime of ``b`` bits is at least ``2**(b - 1)``."""
        rescales = self.depth if rescales is None else rescales
        data = self.coeff_mod_bit_sizes[:-1]
        return sum(b - 1 for b in data[: len(data) - rescales])

    @property
    def refresh_headroom_bits(self) -> int:
        """Bits the modulus left after every rescale holds above the scale."""
        return self.refresh_modulus_bits() - self.scale_bits

    def to_dict(self) -> dict:
        """The parameters as a JSON-able dict (without the free-text ``notes``)."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        d.pop("notes")
        return d


def validate(p: CKKSParams) -> None:
    """Raise :class:`UnsafeParametersError` naming the problem and the fix."""
    n = p.poly_modulus_degree
    if p.security_bits != 128:
        raise UnsafeParametersError(
            f"security_bits={p.security_bits} is not supported; medfed only builds 128-bit "
            "parameter sets. Set security_bits: 128."
        )
    if n not in MAX_LOG_Q_128:
        raise UnsafeParametersError(
            f"poly_modulus_degree={n} is not a supported ring size; use one of "
            f"{sorted(MAX_LOG_Q_128)} (8192 or 16384 for medfed's circuits)."
        )
    chain = p.coeff_mod_bit_sizes
    if len(chain) < 3:
        raise UnsafeParametersError(
            f"coeff_mod_bit_sizes={list(chain)} has too few primes; give at least 3: "
            "[q0, scale, special]."
        )
    if any((not isinstance(b, int)) or b < 17 or b > 60 for b in chain):
        raise UnsafeParametersError(
            f"coeff_mod_bit_sizes={list(chain)}: every prime must be 17..60 bits (SEAL limit)."
        )
    bound = MAX_LOG_Q_128[n]
    if p.log_q > bound:
        raise UnsafeParametersError(
            f"log Q = {p.log_q} bits exceeds {bound}, the 128-bit security bound for N={n} "
            "(HE Standard). Drop a prime, use smaller primes, or double poly_modulus_degree."
        )
    if not 20 <= p.scale_bits <= 60:
        raise UnsafeParametersError(
            f"scale_bits={p.scale_bits} is outside 20..60; set scale_bits in that range (and the "
            "inner primes to the same size)."
        )
    inner = chain[1:-1]
    if p.depth < 1:
        raise UnsafeParametersError(
            f"coeff_mod_bit_sizes={list(chain)} ends in no prime of scale_bits={p.scale_bits}; "
            "the last data primes must equal the scale (one per rescale)."
        )
    if any(b < p.scale_bits for b in p.refresh_primes):
        raise UnsafeParametersError(
            f"inner primes {list(inner)}: those before the {p.depth} scale primes are refresh "
            f"primes and must be at least scale_bits={p.scale_bits}, or every rescale drifts "
            "the scale; set them to the scale or larger."
        )
    if p.refresh_headroom_bits < REFRESH_HEADROOM_BITS:
        need = p.scale_bits + REFRESH_HEADROOM_BITS - p.refresh_modulus_bits()
        raise UnsafeParametersError(
            f"after {p.depth} rescales the chain keeps {p.refresh_modulus_bits()} bits (q0 and "
            f"the refresh primes), {p.refresh_headroom_bits} above the scale; the masked "
            f"refresh needs {REFRESH_HEADROOM_BITS} for 40 bits of statistical security. Add "
            f"a refresh prime of at least {need + 1} bits after q0 (e.g. "
            f"[{chain[0]}, 60, ...]), or make q0 larger."
        )
    if chain[-1] < max(inner, default=0):
        raise UnsafeParametersError(
            f"the special prime ({chain[-1]} bits) must be at least as large as the others."
        )
    # cheap sanity: the chain must leave the ring able to hold q0 + scale
    if math.log2(n) < 10:
        raise UnsafeParametersError("poly_modulus_degree too small for CKKS.")


#: Named presets. ``fast`` is the simulator's default; ``standard`` trades speed for precision.
#: Each keeps one 60-bit refresh prime after q0 (120 bits left after every rescale).
PRESETS: dict[str, CKKSParams] = {
    "fast": CKKSParams(
        16384,
        (60, 60, 40, 40, 40, 40, 60),
        40,
        name="fast",
        notes="N=16384, 4 levels, scale 2^40: ~1e-8 absolute slot error; default.",
    ),
    "standard": CKKSParams(
        16384,
        (60, 60, 40, 40, 40, 40, 40, 60),
        40,
        name="standard",
        notes="N=16384, 5 levels, scale 2^40: ~1e-8 slot error.",
    ),
    "deep": CKKSParams(
        16384,
        (60, 60, 40, 40, 40, 40, 40, 40, 60),
        40,
        name="deep",
        notes="N=16384, 6 levels: room for a degree-7 sigmoid or deeper circuits.",
    ),
}


def get_preset(name: str) -> CKKSParams:
    """Look up a preset by name; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=2)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnsafeParametersError(
            f"unknown CKKS preset {name!r}.{hint} Valid presets: {', '.join(sorted(PRESETS))}."
        ) from None


def params_from_dict(d: dict) -> CKKSParams:
    """Build custom parameters from a config mapping (validated)."""
    allowed = {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "security_bits", "name"}
    unknown = set(d) - allowed
    if unknown:
        raise UnsafeParametersError(
            f"unknown CKKS parameter keys {sorted(unknown)}; allowed: {sorted(allowed)}."
        )
    try:
        return CKKSParams(**d)
    except TypeError as e:
        raise UnsafeParametersError(
            f"incomplete CKKS parameters ({e}); give poly_modulus_degree, coeff_mod_bit_sizes "
            "and scale_bits."
        ) from None
