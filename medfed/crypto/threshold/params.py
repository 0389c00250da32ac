"""The parameter object of the threshold setup (:class:`ThresholdParams`) and its presets.

Validation happens in the constructor and needs no OpenFHE; OpenFHE may still refuse a
parameter set when the context is made (:meth:`ThresholdContext.generate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from medfed.crypto.threshold.errors import ThresholdParamsError


def _is_pow2(x: int) -> bool:
    """Whether ``x`` is a positive int power of two."""
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class ThresholdParams:
    """Everything that decides security and precision of the threshold setup.

    Args:
        parties: number of hospitals n (key shares), at least 2.
        threshold: t, the number of hospitals needed to recover a dropped hospital's share.
            OpenFHE's Shamir sharing requires a majority: n/2 < t <= n. Decryption itself
            always needs all n key shares (some of them recovered).
        ring_dim: CKKS ring dimension N; OpenFHE refuses rings below the 128-bit bound.
        multiplicative_depth: at least 1. Sums need no level, but at depth 0 the modulus is the
            first prime alone and values larger than about 2 (flooding: scale 2**59, q0 2**60)
            wrap around silently. Depth 1 gives 59 bits of headroom.
        scaling_mod_size: scaling-prime bits without flooding (OpenFHE forces 59 with it).
        batch_size: slots per ciphertext (power of two, at most N/2): the longest vector.
        security: always "HEStd_128_classic".
        key_switching: "HYBRID" or "BV". Sums use no key-switching key, but OpenFHE counts
            HYBRID's extra modulus P against the security bound: BV is what lets N = 8192 pass.
        noise_flooding: NOISE_FLOODING_DECRYPT for partial decryptions (see "Noise flooding"
            in docs/threshold-protocol.md).
        max_decryptions: the decryption budget: partial decryptions each key share may make
            (tau in OpenFHE's flooding formula); each doubling costs half a bit of precision.
            Every party counts the partial decryptions it makes and refuses the one beyond
            (:class:`~medfed.crypto.threshold.ThresholdBudgetError`).
    """

    parties: int = 3
    threshold: int = 2
    ring_dim: int = 16384
    multiplicative_depth: int = 1
    scaling_mod_size: int = 50
    batch_size: int = 8192
    security: str = "HEStd_128_classic"
    key_switching: str = "HYBRID"
    noise_flooding: bool = True
    max_decryptions: int = 1024

    def __post_init__(self) -> None:
        def bad(msg: str):
            raise ThresholdParamsError(msg)

        for name in ("parties", "threshold", "ring_dim", "multiplicative_depth", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(f"{name} must be an int, got {v!r}")
        if self.parties < 2:
            bad(f"parties={self.parties}: the threshold setup needs at least 2 hospitals")
        if not 1 <= self.threshold <= self.parties:
            bad(f"threshold={self.threshold} must satisfy 1 <= t <= parties={self.parties}")
        if self.threshold <= self.parties // 2:
            bad(
                f"threshold={self.threshold} of parties={self.parties}: OpenFHE's Shamir sharing "
                f"(ShareKeys) requires a majority, t > n/2, i.e. t >= {self.parties // 2 + 1}"
            )
        if self.security != "HEStd_128_classic":
            bad(f"security={self.security!r}: medfed always uses 'HEStd_128_classic' (128-bit)")
        if not _is_pow2(self.ring_dim) or self.ring_dim < 1024:
            bad(f"ring_dim={self.ring_dim} must be a power of two >= 1024")
        if not 1 <= self.multiplicative_depth <= 20:
            bad(
                f"multiplicative_depth={self.multiplicative_depth} must be in 1..20 (depth 0 "
                "leaves only the first prime: sums larger than ~2 wrap around silently)"
            )
        if not isinstance(self.scaling_mod_size, int) or not 30 <= self.scaling_mod_size <= 59:
            bad(f"scaling_mod_size={self.scaling_mod_size!r} must be an int in 30..59")
        if not _is_pow2(self.batch_size) or self.batch_size > self.ring_dim // 2:
            bad(
                f"batch_size={self.batch_size} must be a power of two <= ring_dim/2 "
                f"= {self.ring_dim // 2}"
            )
        if self.key_switching not in ("HYBRID", "BV"):
            bad(f"key_switching={self.key_switching!r} must be 'HYBRID' or 'BV'")
        if not isinstance(self.noise_flooding, bool):
            bad(f"noise_flooding must be a bool, got {self.noise_flooding!r}")
        if (
            not isinstance(self.max_decryptions, int)
            or isinstance(self.max_decryptions, bool)
            or self.max_decryptions < 1
        ):
            bad(f"max_decryptions={self.max_decryptions!r} must be a positive int")

    def with_parties(self, parties: int, threshold: int | None = None) -> ThresholdParams:
        """Same parameters for ``parties`` hospitals; threshold defaults to a bare majority."""
        t = parties // 2 + 1 if threshold is None else threshold
        return replace(self, parties=parties, threshold=t)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (what the context header carries)."""
        return asdict(self)


#: Named presets. "test" is the smallest ring OpenFHE accepts at 128-bit security for depth 1
#: (N = 4096 is refused: log Q = 119 bits > 109). "training": encrypted training on joint
#: evaluation keys with the collective refresh. An epoch uses 4 levels and the refresh
#: (interactive bootstrapping, compression COMPACT) needs 3 limbs left after the epoch's last
#: rescale: depth 6. HYBRID key switching (BV's noise, ~2^70, would swamp rotations of fresh
#: ciphertexts) with that depth needs N = 32768 for 128-bit security.
THRESHOLD_PRESETS: dict[str, ThresholdParams] = {
    "default": ThresholdParams(),
    "test": ThresholdParams(ring_dim=8192, batch_size=4096, key_switching="BV"),
    "training": ThresholdParams(
        ring_dim=32768, batch_size=16384, multiplicative_depth=6, scaling_mod_size=59
    ),
}
