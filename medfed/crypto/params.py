"""CKKS parameters: one validated object, named presets, nothing scattered.

Every number that decides security or precision lives in :class:`CKKSParams`. Validation
follows the Homomorphic Encryption Standard (Albrecht et al., 2018, table for 128-bit classical
security, ternary secrets): the total coefficient-modulus bit count ``log Q`` must not exceed
the bound for the ring size. SEAL enforces the same bound again when a context is built.
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

#: Bits of room kept between a decrypted value's magnitude and the first prime's capacity.
PRECISION_MARGIN_BITS = 4


class UnsafeParametersError(MedfedError, ValueError):
    """CKKS parameters that are insecure, inconsistent, or unusable for medfed's circuits."""


@dataclass(frozen=True)
class CKKSParams:
    """A complete CKKS parameter set.

    Args:
        poly_modulus_degree: ring dimension N (slots = N / 2).
        coeff_mod_bit_sizes: bit sizes of the modulus chain ``[q0, q1..qL, special]``. Inner
            primes equal ``scale_bits`` so that each rescale keeps the scale stable.
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
        """Multiplicative depth: rescales available between q0 and the special prime."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def log_q(self) -> int:
        """Total coefficient-modulus bits (what the security bound limits)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        """The CKKS encoding scale, ``2 ** scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest magnitude a fully rescaled ciphertext can hold, minus a margin."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - PRECISION_MARGIN_BITS

    @property
    def mask_bits(self) -> int:
        """log2 bound of the additive masks used when a hospital refreshes masked values."""
        return self.headroom_bits - 1

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
    if any(b != p.scale_bits for b in inner):
        raise UnsafeParametersError(
            f"inner primes {list(inner)} must all equal scale_bits={p.scale_bits}, or every "
            "rescale drifts the scale; set them to the scale."
        )
    if p.headroom_bits < 10:
        raise UnsafeParametersError(
            f"q0={chain[0]} bits leaves {p.headroom_bits} bits above the scale "
            f"({p.scale_bits}); masked refresh values would overflow. Make q0 at least "
            f"{p.scale_bits + PRECISION_MARGIN_BITS + 10} bits."
        )
    if chain[-1] < max(inner, default=0):
        raise UnsafeParametersError(
            f"the special prime ({chain[-1]} bits) must be at least as large as the others."
        )
    # cheap sanity: the chain must leave the ring able to hold q0 + scale
    if math.log2(n) < 10:
        raise UnsafeParametersError("poly_modulus_degree too small for CKKS.")


#: Named presets. ``fast`` is the simulator's default; ``standard`` trades speed for precision.
PRESETS: dict[str, CKKSParams] = {
    "fast": CKKSParams(
        8192,
        (49, 30, 30, 30, 30, 49),
        30,
        name="fast",
        notes="N=8192, 4 levels, scale 2^30: ~1e-5 absolute slot error; default.",
    ),
    "standard": CKKSParams(
        16384,
        (60, 40, 40, 40, 40, 40, 60),
        40,
        name="standard",
        notes="N=16384, 5 levels, scale 2^40: ~1e-8 slot error, ~4x slower than fast.",
    ),
    "deep": CKKSParams(
        16384,
        (60, 40, 40, 40, 40, 40, 40, 40, 58),
        40,
        name="deep",
        notes="N=16384, 7 levels: headroom for deeper circuits (e.g. several epochs per refresh).",
    ),
    "fast-shallow": CKKSParams(
        8192,
        (52, 35, 35, 35, 52),
        35,
        name="fast-shallow",
        notes="N=8192, 3 levels: enough for the degree-1 approximation only.",
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
