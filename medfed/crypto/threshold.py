"""Threshold CKKS for the threshold key setup: OpenFHE multiparty keys, flooded partial
decryptions, Shamir t-of-n recovery of dropped hospitals' key shares.

Imports only numpy, ``openfhe`` and :mod:`medfed.crypto.channel` (no torch, timm, tenseal or
flwr). OpenFHE publishes wheels only for CPython 3.10 and 3.12, so this module imports on any
Python, and every entry point that needs OpenFHE raises :class:`ThresholdUnavailableError` when
it is missing. :class:`ThresholdParams` and :data:`THRESHOLD_PRESETS` work without OpenFHE.

Protocol (mode "updates", hospitals ``1..n``; everything on the wire is ``bytes``)
-------------------------------------------------------------------------------------
0. Setup. Hospital 1 runs :meth:`ThresholdContext.generate` and publishes
   :meth:`ThresholdContext.to_bytes` (public CKKS parameters, no key). Every hospital makes a
   :class:`ThresholdParty` with a channel :class:`~medfed.crypto.channel.Identity` and publishes
   its ``public_bundle``; all learn all bundles (:meth:`ThresholdParty.set_peers`).
1. Key chain. Hospital 1 runs ``keygen()`` (OpenFHE ``KeyGen``), hospital ``i > 1`` runs
   ``keygen(previous)`` (``MultipartyKeyGen``) on hospital ``i-1``'s output. Hospital ``n``'s
   output is the joint public key; everyone calls ``set_joint_public_key``. The secret key is
   ``s = s_1 + ... + s_n``; nobody ever holds ``s``.
2. Shamir sharing (optional: without it the setup is n-of-n). Each hospital calls
   ``share_key()`` (OpenFHE ``ShareKeys(s_i, n, t, i, "shamir")``) and gets one message per
   other hospital, sealed with :mod:`medfed.crypto.channel`; the recipient calls
   ``accept_key_share``.
3. Each round: hospitals ``encrypt`` their sample-weighted update under the joint key; the
   :class:`ThresholdAggregator` ``add``\\ s the ciphertexts and sends the aggregate back.
4. Decryption: each hospital runs ``partial_decrypt(aggregate)`` for every key share it holds
   (share 1 uses ``MultipartyDecryptLead``, the others ``MultipartyDecryptMain``), seals the
   result to each hospital that fuses (``seal_to``), the aggregator relays the sealed bytes,
   the recipient opens them (``open_from``) and runs ``fuse`` (``MultipartyDecryptFusion``).
   ``fuse`` refuses unless every key share ``1..n`` contributed exactly once.
5. Dropout: if hospital ``d`` is gone after step 2, any surviving hospital ``R`` collects
   ``recovery_share(d, R)`` from ``t - 1`` other survivors and runs ``recover_key(d, ...)``
   (``RecoverSharedKey``); from then on ``R`` also produces ``d``'s partial decryption.

Who learns what
---------------
* Aggregator: the context, the joint public key, every ciphertext, and the sizes/senders/
  recipients of sealed messages. No secret key, no partial decryption, no plaintext.
* Hospital ``i``: its share ``s_i``; one Shamir share ``f_j(i)`` of every other ``s_j``; the
  aggregate plaintext (the sum, which is the intended output); the flooded partial
  decryptions sealed to it. A recovering hospital also learns the dropped hospital's ``s_d``.
* Collusion: any ``t`` hospitals together can rebuild every other share (that is what makes
  recovery possible) and so decrypt any single hospital's ciphertext they can get from the
  aggregator. Fewer than ``t`` hospitals learn nothing beyond the aggregates. Without step 2,
  only all ``n`` together can decrypt.
* Honest-but-curious only: a malicious aggregator could ask hospitals to partially decrypt
  one hospital's ciphertext instead of the sum; hospitals cannot tell (they check only that it
  is under the joint key), as in the shared-key setup.

Noise flooding (what OpenFHE 1.6.1 actually does for CKKS)
----------------------------------------------------------
* ``NOISE_FLOODING_MULTIPARTY`` (``SetMultipartyMode``) is refused for CKKS ("not supported in
  CKKSRNS. Use NOISE_FLOODING_DECRYPT and EXEC_EVALUATION instead"), and the CKKS context
  always uses ``FIXED_NOISE_MULTIPARTY``.
* With ``noise_flooding=True`` (default) the context uses ``NOISE_FLOODING_DECRYPT`` in
  ``EXEC_EVALUATION`` mode. Every ``MultipartyDecryptLead``/``Main`` then adds a discrete
  Gaussian with standard deviation ``sigma = sqrt(12 * tau) * 2**(s/2) * 2**noise_estimate``
  (OpenFHE's formula; ``s = 30`` bits of statistical security and ``tau = 1`` are fixed: OpenFHE
  1.6.1 refuses ``SetStatisticalSecurity``/``SetNumAdversarialQueries`` for CKKS). The
  noise estimate comes from :meth:`ThresholdContext.generate`: it runs the same protocol
  (n throwaway multiparty keys, n encryptions summed, partial decryptions, fusion) in
  ``EXEC_NOISE_ESTIMATION`` mode and reads the fused plaintext's ``GetLogError()``. That
  measurement includes the fixed 2**20 smudging of each partial decryption, so it bounds the
  aggregate's noise from above (by about 10 bits). medfed rounds it up to a whole bit and adds
  ``0.5 * log2(max_decryptions)``, which is exactly OpenFHE's ``tau = max_decryptions`` term.
  In this mode OpenFHE (64-bit build) forces scaling primes of 59 bits and a 60-bit first
  prime, whatever ``scaling_mod_size`` says.
* With ``noise_flooding=False`` each partial decryption adds OpenFHE's fixed Gaussian of
  standard deviation 2**20 (``NoiseFlooding::MP_SD``) and decoding adds CKKS's usual
  estimated-noise Gaussian: more precise, but no statistical-security argument.
* In both modes the error is absolute (it does not grow with the values):
  :attr:`ThresholdContext.tolerance` is a per-slot bound (8 standard deviations).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from medfed.crypto.channel import Identity, channel_context, open_sealed, seal

try:  # OpenFHE wheels exist for CPython 3.10 and 3.12 only
    import openfhe as _ofhe
except (ImportError, OSError) as _e:  # pragma: no cover - depends on the interpreter
    _ofhe = None
    _IMPORT_ERROR: str | None = f"{type(_e).__name__}: {_e}"
else:
    _IMPORT_ERROR = None

__all__ = [
    "THRESHOLD_PRESETS",
    "ThresholdAggregator",
    "ThresholdContext",
    "ThresholdError",
    "ThresholdParams",
    "ThresholdParamsError",
    "ThresholdParty",
    "ThresholdUnavailableError",
    "openfhe_available",
]

#: Statistical security (bits) and adversarial queries OpenFHE 1.6.1 uses for CKKS flooding.
OPENFHE_STATISTICAL_SECURITY = 30
#: log2 of OpenFHE's flooding factor sqrt(12 * tau) * 2**(s/2) with tau = 1, s = 30.
_LOG2_FLOOD_FACTOR = OPENFHE_STATISTICAL_SECURITY / 2 + math.log2(math.sqrt(12.0))
#: OpenFHE's fixed partial-decryption smudging (NoiseFlooding::MP_SD = 2**20).
_FIXED_SMUDGING_STD = float(2**20)
#: OpenFHE (64-bit) refuses flooding when log2(sigma) exceeds 56 bits.
_MAX_FLOOD_BITS = 56.0

_CONTEXT_MAGIC = b"MFTHCTX1"
_PARTIAL_MAGIC = b"MFPD1"
_SHARE_MAGIC = b"MFKS1"
PURPOSE_KEY_SHARE = "threshold/key-share"
PURPOSE_RECOVERY_SHARE = "threshold/recovery-share"
PURPOSE_PARTIAL = "threshold/partial-decryption"


class ThresholdUnavailableError(RuntimeError):
    """OpenFHE cannot be imported in this Python."""


class ThresholdParamsError(ValueError):
    """Threshold parameters that are insecure, inconsistent, or refused by OpenFHE."""


class ThresholdError(ValueError):
    """A protocol step that cannot proceed: malformed bytes, missing shares or partials."""


def openfhe_available() -> bool:
    return _ofhe is not None


def _require_openfhe():
    if _ofhe is None:
        raise ThresholdUnavailableError(
            f"the threshold key setup needs OpenFHE, which this Python "
            f"({sys.version.split()[0]}) cannot import ({_IMPORT_ERROR}). OpenFHE publishes "
            "wheels only for CPython 3.10 and 3.12; create a Python 3.10 environment and `pip "
            'install -e ".[threshold]"` (or use --keys shared). In a checkout, '
            "`bash .ci/threshold_env.sh` builds such an environment (.venv-threshold)."
        )
    return _ofhe


# --------------------------------------------------------------------------------------------
# Parameters


def _is_pow2(x: int) -> bool:
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
        noise_flooding: NOISE_FLOODING_DECRYPT for partial decryptions (see the module doc).
        max_decryptions: decryptions expected under one joint key (tau in OpenFHE's flooding
            formula); each doubling costs half a bit of precision.
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
        return asdict(self)


#: Named presets. "test" is the smallest ring OpenFHE accepts at 128-bit security for depth 1
#: (N = 4096 is refused: log Q = 119 bits > 109).
THRESHOLD_PRESETS: dict[str, ThresholdParams] = {
    "default": ThresholdParams(),
    "test": ThresholdParams(ring_dim=8192, batch_size=4096, key_switching="BV"),
}


# --------------------------------------------------------------------------------------------
# Context


def _ccparams(params: ThresholdParams, *, estimation: bool, noise_estimate: float | None):
    of = _require_openfhe()
    p = of.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(params.multiplicative_depth)
    p.SetScalingModSize(params.scaling_mod_size)
    p.SetBatchSize(params.batch_size)
    p.SetRingDim(params.ring_dim)
    p.SetSecurityLevel(of.HEStd_128_classic)
    p.SetScalingTechnique(of.FIXEDAUTO)
    p.SetKeySwitchTechnique(of.HYBRID if params.key_switching == "HYBRID" else of.BV)
    if params.noise_flooding:
        p.SetDecryptionNoiseMode(of.NOISE_FLOODING_DECRYPT)
        if estimation:
            p.SetExecutionMode(of.EXEC_NOISE_ESTIMATION)
        else:
            p.SetExecutionMode(of.EXEC_EVALUATION)
            p.SetNoiseEstimate(float(noise_estimate))
    return p


def _enable(cc) -> None:
    of = _require_openfhe()
    for feature in (of.PKE, of.KEYSWITCH, of.LEVELEDSHE, of.MULTIPARTY):
        cc.Enable(feature)


def _make_cc(params: ThresholdParams, *, estimation: bool, noise_estimate: float | None):
    of = _require_openfhe()
    try:
        cc = of.GenCryptoContext(
            _ccparams(params, estimation=estimation, noise_estimate=noise_estimate)
        )
    except RuntimeError as e:
        reason = str(e).split(":")[-1].strip()
        raise ThresholdParamsError(f"OpenFHE refused {params}: {reason}") from None
    _enable(cc)
    return cc


def _measure_noise(params: ThresholdParams) -> float:
    """Run the round's computation once in EXEC_NOISE_ESTIMATION mode with throwaway keys."""
    cc = _make_cc(params, estimation=True, noise_estimate=None)
    keys = [cc.KeyGen()]
    for _ in range(1, params.parties):
        keys.append(cc.MultipartyKeyGen(keys[-1].publicKey))
    joint = keys[-1].publicKey
    rng = np.random.default_rng()
    total = None
    for _ in range(params.parties):
        x = rng.uniform(-1.0, 1.0, size=params.batch_size).tolist()
        ct = cc.Encrypt(joint, cc.MakeCKKSPackedPlaintext(x))
        total = ct if total is None else cc.EvalAdd(total, ct)
    partials = [cc.MultipartyDecryptLead([total], keys[0].secretKey)[0]]
    partials += [cc.MultipartyDecryptMain([total], k.secretKey)[0] for k in keys[1:]]
    return float(cc.MultipartyDecryptFusion(partials).GetLogError())


class ThresholdContext:
    """The public CKKS context every party shares (no key material).

    Make it with :meth:`generate` (one hospital) and send :meth:`to_bytes` to the others and
    to the aggregator, who call :meth:`from_bytes`.
    """

    def __init__(self, params: ThresholdParams, noise_estimate: float | None, cc, raw: bytes):
        self.params = params
        self.noise_estimate = noise_estimate
        self._cc = cc
        self._bytes = raw

    @classmethod
    def generate(cls, params: ThresholdParams) -> ThresholdContext:
        of = _require_openfhe()
        if not isinstance(params, ThresholdParams):
            raise ThresholdParamsError(f"expected ThresholdParams, got {type(params).__name__}")
        estimate = None
        if params.noise_flooding:
            measured = _measure_noise(params)
            estimate = math.ceil(measured) + 0.5 * math.log2(params.max_decryptions)
            if _LOG2_FLOOD_FACTOR + estimate > _MAX_FLOOD_BITS:
                raise ThresholdParamsError(
                    f"flooding noise 2^{_LOG2_FLOOD_FACTOR + estimate:.1f} exceeds what OpenFHE "
                    f"supports (2^{_MAX_FLOOD_BITS:.0f}); lower max_decryptions"
                )
        cc = _make_cc(params, estimation=False, noise_estimate=estimate)
        header = json.dumps(
            {
                "params": params.to_dict(),
                "noise_estimate": estimate,
                "openfhe": _openfhe_version(),
            },
            sort_keys=True,
        ).encode()
        raw = _CONTEXT_MAGIC + struct.pack(">I", len(header)) + header + of.Serialize(cc, of.BINARY)
        return cls(params, estimate, cc, raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> ThresholdContext:
        of = _require_openfhe()
        data = bytes(data)
        if not data.startswith(_CONTEXT_MAGIC) or len(data) < len(_CONTEXT_MAGIC) + 4:
            raise ThresholdError("not a medfed threshold context (bad magic)")
        off = len(_CONTEXT_MAGIC)
        (hlen,) = struct.unpack(">I", data[off : off + 4])
        try:
            header = json.loads(data[off + 4 : off + 4 + hlen])
            params = ThresholdParams(**header["params"])
            estimate = header["noise_estimate"]
        except (ValueError, KeyError, TypeError) as e:
            raise ThresholdError(f"malformed threshold context header: {e}") from None
        try:
            cc = of.DeserializeCryptoContextString(data[off + 4 + hlen :], of.BINARY)
        except RuntimeError as e:
            raise ThresholdError(f"malformed threshold context: {e}") from None
        expected_ks = of.HYBRID if params.key_switching == "HYBRID" else of.BV
        consistent = (
            cc.GetRingDimension() == params.ring_dim
            and cc.GetBatchSize() == params.batch_size
            and cc.GetMultiplicativeDepth() == params.multiplicative_depth
            and cc.GetKeySwitchTechnique() == expected_ks
            and cc.GetScalingTechnique() == of.FIXEDAUTO
            and (estimate is None) == (not params.noise_flooding)
            and float(cc.GetNoiseEstimate()) == float(estimate or 0.0)
        )
        if not consistent:
            raise ThresholdError("threshold context header and OpenFHE context disagree")
        _enable(cc)
        return cls(params, estimate, cc, data)

    def to_bytes(self) -> bytes:
        return self._bytes

    @property
    def slots(self) -> int:
        return self.params.batch_size

    @property
    def scale_bits(self) -> float:
        return math.log2(self._cc.GetScalingFactorReal(0))

    @property
    def modulus_bits(self) -> float:
        return math.log2(self._cc.GetModulus())

    @property
    def smudging_std_bits(self) -> float:
        """log2 of the standard deviation each partial decryption adds (coefficient domain)."""
        if self.noise_estimate is None:
            return math.log2(_FIXED_SMUDGING_STD)
        return _LOG2_FLOOD_FACTOR + self.noise_estimate

    @property
    def tolerance(self) -> float:
        """Per-slot absolute error bound of a fused decryption (8 standard deviations).

        n partial decryptions each add a Gaussian of std 2**smudging_std_bits per coefficient;
        a slot sums N/2 such terms after division by the scale; CKKS decoding then adds a
        Gaussian of twice the estimated variance (so the factor sqrt(3)).
        """
        n, ring = self.params.parties, self.params.ring_dim
        slot_std = (
            math.sqrt(n * ring / 2) * 2.0 ** (self.smudging_std_bits - self.scale_bits)
        ) * math.sqrt(3.0)
        return 8.0 * slot_std

    @property
    def max_abs_value(self) -> float:
        """Largest |value| one hospital may encrypt so that the sum of n cannot wrap."""
        headroom_bits = self.modulus_bits - self.scale_bits - 2
        return 2.0**headroom_bits / self.params.parties

    def describe(self) -> dict[str, Any]:
        return {
            **self.params.to_dict(),
            "noise_estimate_bits": self.noise_estimate,
            "smudging_std_bits": round(self.smudging_std_bits, 2),
            "scale_bits": round(self.scale_bits, 2),
            "modulus_bits": round(self.modulus_bits, 2),
            "tolerance": self.tolerance,
            "openfhe": _openfhe_version(),
        }

    def __repr__(self) -> str:
        return f"ThresholdContext({self.params}, noise_estimate={self.noise_estimate})"

    # --- helpers shared by parties and aggregator ------------------------------------------

    def _ciphertext(self, data: bytes, what: str):
        of = _require_openfhe()
        if not isinstance(data, bytes | bytearray) or not data:
            raise ThresholdError(f"{what} must be non-empty bytes")
        try:
            ct = of.DeserializeCiphertextString(bytes(data), of.BINARY)
        except RuntimeError as e:
            raise ThresholdError(f"{what} is not an OpenFHE ciphertext: {e}") from None
        if ct.GetCryptoContext().GetRingDimension() != self.params.ring_dim:
            raise ThresholdError(f"{what} belongs to another CKKS context")
        return ct

    def _serialize(self, obj) -> bytes:
        of = _require_openfhe()
        return of.Serialize(obj, of.BINARY)


def _openfhe_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("openfhe")
    except Exception:  # noqa: BLE001 - metadata is informative only
        return None


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(bytes(data)).digest()


# --------------------------------------------------------------------------------------------
# Aggregator


class ThresholdAggregator:
    """What the aggregator runs: public context (and joint public key) only.

    It deserializes ciphertexts and adds them (``EvalAdd``). It has no secret key, no
    partial-decryption or fusion method, and only ever relays sealed hospital-to-hospital
    messages as opaque bytes. Plaintext-scalar weighting is deliberately not offered: at
    depth 1 a multiplication consumes the only level and leaves the first prime alone (with
    flooding: |values| < 2); hospitals send sample-weighted updates and their sample count.
    """

    def __init__(self, context: ThresholdContext | bytes, joint_public_key: bytes | None = None):
        _require_openfhe()
        if not isinstance(context, ThresholdContext):
            context = ThresholdContext.from_bytes(context)
        self.context = context
        self.joint_key_tag: str | None = None
        if joint_public_key is not None:
            self.joint_key_tag = _deserialize_public_key(joint_public_key).GetKeyTag()

    def add(self, ciphertexts: Sequence[bytes]) -> bytes:
        """Sum of 1..n ciphertexts (the noise estimate covers n summands)."""
        cts = list(ciphertexts)
        if not cts:
            raise ThresholdError("add() needs at least one ciphertext")
        if len(cts) > self.context.params.parties:
            raise ThresholdError(
                f"add() got {len(cts)} ciphertexts; the context's noise estimate covers sums of "
                f"at most parties={self.context.params.parties}"
            )
        cc = self.context._cc
        total = None
        for i, data in enumerate(cts):
            ct = self.context._ciphertext(data, f"ciphertext {i}")
            if self.joint_key_tag is not None and ct.GetKeyTag() != self.joint_key_tag:
                raise ThresholdError(f"ciphertext {i} is not encrypted under the joint public key")
            try:
                total = ct if total is None else cc.EvalAdd(total, ct)
            except RuntimeError as e:
                raise ThresholdError(f"cannot add ciphertext {i}: {e}") from None
        return self.context._serialize(total)


def _deserialize_public_key(data: bytes):
    of = _require_openfhe()
    try:
        return of.DeserializePublicKeyString(bytes(data), of.BINARY)
    except (RuntimeError, TypeError) as e:
        raise ThresholdError(f"not an OpenFHE public key: {e}") from None


# --------------------------------------------------------------------------------------------
# Party (hospital)


def _pack_partials(digest: bytes, items: Sequence[tuple[int, bytes]]) -> bytes:
    out = bytearray(_PARTIAL_MAGIC + digest + struct.pack(">B", len(items)))
    for share, blob in items:
        out += struct.pack(">HI", share, len(blob)) + blob
    return bytes(out)


def _unpack_partials(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    data = bytes(data)
    head = len(_PARTIAL_MAGIC)
    if not data.startswith(_PARTIAL_MAGIC) or len(data) < head + 33:
        raise ThresholdError("not a medfed partial decryption (bad magic)")
    digest = data[head : head + 32]
    (count,) = struct.unpack(">B", data[head + 32 : head + 33])
    off, items = head + 33, []
    for _ in range(count):
        if off + 6 > len(data):
            raise ThresholdError("partial decryption truncated")
        share, size = struct.unpack(">HI", data[off : off + 6])
        off += 6
        if off + size > len(data):
            raise ThresholdError("partial decryption truncated")
        items.append((share, data[off : off + size]))
        off += size
    if off != len(data):
        raise ThresholdError("partial decryption has trailing bytes")
    return digest, items


class ThresholdParty:
    """One hospital's side: its key share, Shamir shares it holds, and the decrypt flow.

    The key share never leaves this object except as OpenFHE ``ShareKeys`` outputs sealed to
    one recipient each. The object refuses to be pickled.

    Args:
        context: the shared :class:`ThresholdContext`.
        index: this hospital's position 1..n in the key chain (and its Shamir x-coordinate).
        identity: channel keys; a fresh one by default.
        run_id: bound into every sealed message's context with round, sender and recipient.
    """

    def __init__(
        self,
        context: ThresholdContext,
        index: int,
        identity: Identity | None = None,
        *,
        run_id: str = "medfed",
    ):
        _require_openfhe()
        n = context.params.parties
        if not isinstance(index, int) or not 1 <= index <= n:
            raise ThresholdError(f"party index {index!r} must be in 1..{n}")
        self.context = context
        self.index = index
        self.run_id = run_id
        self._identity = identity if identity is not None else Identity.generate()
        self._peers: dict[int, bytes] = {index: self._identity.public_bundle()}
        self._secret = None
        self._own_public = None
        self._joint = None
        self._joint_bytes: bytes | None = None
        self._held: dict[int, Any] = {}  # owner j -> Shamir share f_j(self.index) (DCRTPoly)
        self._recovered: dict[int, Any] = {}  # owner d -> recovered key share s_d

    # --- identity / directory -----------------------------------------------------------------

    @property
    def public_bundle(self) -> bytes:
        return self._identity.public_bundle()

    def set_peers(self, bundles: Mapping[int, bytes]) -> None:
        """All hospitals' public bundles by index (as relayed by the aggregator)."""
        n = self.context.params.parties
        if set(bundles) != set(range(1, n + 1)):
            raise ThresholdError(f"set_peers needs the bundles of parties 1..{n}")
        if bytes(bundles[self.index]) != self.public_bundle:
            raise ThresholdError(f"bundle {self.index} is not this party's own bundle")
        self._peers = {int(k): bytes(v) for k, v in bundles.items()}

    def _peer(self, j: int) -> bytes:
        if j not in self._peers:
            raise ThresholdError(f"no public bundle for party {j}: call set_peers first")
        return self._peers[j]

    def _ctx(self, round: int, sender: int, recipient: int, purpose: str) -> bytes:
        return channel_context(self.run_id, round, f"party-{sender}", f"party-{recipient}", purpose)

    def seal_to(
        self, recipient: int, payload: bytes, *, round: int, purpose: str = PURPOSE_PARTIAL
    ) -> bytes:
        """Seal ``payload`` for hospital ``recipient`` (bound to run, round, both parties)."""
        if recipient == self.index:
            raise ThresholdError("no need to seal a message to oneself")
        ctx = self._ctx(round, self.index, recipient, purpose)
        return seal(self._identity, self._peer(recipient), payload, ctx)

    def open_from(
        self, sender: int, sealed: bytes, *, round: int, purpose: str = PURPOSE_PARTIAL
    ) -> bytes:
        """Open a message hospital ``sender`` sealed to this hospital (ChannelError if not)."""
        ctx = self._ctx(round, sender, self.index, purpose)
        return open_sealed(self._identity, self._peer(sender), sealed, ctx)

    # --- key generation -----------------------------------------------------------------------

    def keygen(self, previous_public_key: bytes | None = None) -> bytes:
        """Generate this party's key share; return the running joint public key (bytes).

        Party 1 passes nothing (``KeyGen``); party i > 1 passes party i-1's output
        (``MultipartyKeyGen``). Party n's output is the joint public key.
        """
        if self._secret is not None:
            raise ThresholdError(f"party {self.index} already generated its key share")
        cc = self.context._cc
        if self.index == 1:
            if previous_public_key is not None:
                raise ThresholdError("party 1 starts the key chain: pass no previous key")
            kp = cc.KeyGen()
        else:
            if previous_public_key is None:
                raise ThresholdError(f"party {self.index} needs party {self.index - 1}'s key")
            kp = cc.MultipartyKeyGen(_deserialize_public_key(previous_public_key))
        self._secret, self._own_public = kp.secretKey, kp.publicKey
        out = self.context._serialize(kp.publicKey)
        if self.index == self.context.params.parties:
            self.set_joint_public_key(out)
        return out

    def set_joint_public_key(self, joint_public_key: bytes) -> None:
        self._joint = _deserialize_public_key(joint_public_key)
        self._joint_bytes = bytes(joint_public_key)

    @property
    def joint_public_key(self) -> bytes:
        if self._joint_bytes is None:
            raise ThresholdError("the joint public key is not known yet")
        return self._joint_bytes

    @property
    def key_shares(self) -> tuple[int, ...]:
        """Indices of the key shares this party can partially decrypt with."""
        own = (self.index,) if self._secret is not None else ()
        return tuple(sorted(own + tuple(self._recovered)))

    def _need_secret(self):
        if self._secret is None:
            raise ThresholdError(f"party {self.index} has no key share yet: run keygen first")
        return self._secret

    # --- Shamir sharing and recovery ------------------------------------------------------

    def _share_container(self):
        """An empty ciphertext at full level, used as OpenFHE's serializable DCRTPoly box."""
        cc = self.context._cc
        return cc.Encrypt(self._own_public, cc.MakeCKKSPackedPlaintext([0.0])).CloneEmpty()

    def _pack_share(self, owner: int, holder: int, poly, box) -> bytes:
        box.SetElements([poly])
        return _SHARE_MAGIC + struct.pack(">HH", owner, holder) + self.context._serialize(box)

    def _unpack_share(self, data: bytes) -> tuple[int, int, Any]:
        head = len(_SHARE_MAGIC) + 4
        if not data.startswith(_SHARE_MAGIC) or len(data) <= head:
            raise ThresholdError("not a medfed key share (bad magic)")
        owner, holder = struct.unpack(">HH", data[len(_SHARE_MAGIC) : head])
        elements = self.context._ciphertext(data[head:], "key share").GetElements()
        if len(elements) != 1:
            raise ThresholdError("malformed key share")
        return owner, holder, elements[0]

    def share_key(self, *, round: int = 0) -> dict[int, bytes]:
        """Shamir-share this party's key share: one sealed message per other party."""
        p = self.context.params
        shares = self.context._cc.ShareKeys(
            self._need_secret(), p.parties, p.threshold, self.index, "shamir"
        )
        box = self._share_container()
        out = {}
        for j in range(1, p.parties + 1):
            if j != self.index:
                payload = self._pack_share(self.index, j, shares[j], box)
                out[j] = self.seal_to(j, payload, round=round, purpose=PURPOSE_KEY_SHARE)
        return out

    def accept_key_share(self, sender: int, sealed: bytes, *, round: int = 0) -> None:
        """Keep the Shamir share of ``sender``'s key that ``sender`` sealed to this party."""
        payload = self.open_from(sender, sealed, round=round, purpose=PURPOSE_KEY_SHARE)
        owner, holder, poly = self._unpack_share(payload)
        if owner != sender or holder != self.index:
            raise ThresholdError(f"key share is for ({owner}->{holder}), not ({sender}->me)")
        self._held[owner] = poly

    def recovery_share(self, dropped: int, recoverer: int, *, round: int) -> bytes:
        """Hand this party's share of ``dropped``'s key to ``recoverer``, sealed."""
        if dropped not in self._held:
            raise ThresholdError(f"party {self.index} holds no share of party {dropped}'s key")
        payload = self._pack_share(
            dropped, self.index, self._held[dropped], self._share_container()
        )
        return self.seal_to(recoverer, payload, round=round, purpose=PURPOSE_RECOVERY_SHARE)

    def recover_key(self, dropped: int, sealed_shares: Mapping[int, bytes], *, round: int) -> None:
        """Rebuild ``dropped``'s key share from t Shamir shares (this party's own included).

        ``sealed_shares`` maps each other survivor's index to its :meth:`recovery_share`.
        """
        p = self.context.params
        if dropped == self.index or dropped in self._recovered:
            raise ThresholdError(f"party {self.index} already holds key share {dropped}")
        shares = {}
        if dropped in self._held:
            shares[self.index] = self._held[dropped]
        for sender, sealed in sealed_shares.items():
            payload = self.open_from(sender, sealed, round=round, purpose=PURPOSE_RECOVERY_SHARE)
            owner, holder, poly = self._unpack_share(payload)
            if owner != dropped or holder != sender:
                raise ThresholdError(f"party {sender} sent a share of ({owner}->{holder})")
            shares[holder] = poly
        if len(shares) < p.threshold:
            raise ThresholdError(
                f"recovering party {dropped}'s key share needs t={p.threshold} Shamir shares, "
                f"got {len(shares)}"
            )
        of = _require_openfhe()
        key = of.PrivateKey(self.context._cc)
        try:
            self.context._cc.RecoverSharedKey(key, shares, p.parties, p.threshold, "shamir")
        except RuntimeError as e:
            raise ThresholdError(f"RecoverSharedKey failed: {e}") from None
        self._recovered[dropped] = key

    # --- data -----------------------------------------------------------------------------

    def encrypt(self, vector: Sequence[float] | np.ndarray) -> bytes:
        """Encrypt a real vector (length <= batch_size) under the joint public key."""
        if self._joint is None:
            raise ThresholdError("the joint public key is not known yet")
        x = np.asarray(vector, dtype=np.float64)
        if x.ndim != 1 or not 1 <= x.size <= self.context.slots:
            raise ThresholdError(
                f"expected a 1-D vector of length 1..{self.context.slots}, got shape {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            raise ThresholdError("vector has non-finite values")
        if x.size and float(np.max(np.abs(x))) >= self.context.max_abs_value:
            raise ThresholdError(
                f"|values| must stay below {self.context.max_abs_value:.3g} so that the sum of "
                f"{self.context.params.parties} cannot wrap around the modulus"
            )
        cc = self.context._cc
        return self.context._serialize(
            cc.Encrypt(self._joint, cc.MakeCKKSPackedPlaintext(x.tolist()))
        )

    def partial_decrypt(self, aggregate: bytes) -> bytes:
        """Flooded partial decryptions of ``aggregate`` for every key share this party holds.

        The result is secret-bearing: send it only through :meth:`seal_to`.
        """
        self._need_secret()
        ct = self.context._ciphertext(aggregate, "aggregate")
        if self._joint is not None and ct.GetKeyTag() != self._joint.GetKeyTag():
            raise ThresholdError("aggregate is not encrypted under the joint public key")
        cc = self.context._cc
        keys = {self.index: self._secret, **self._recovered}
        items = []
        for share in sorted(keys):
            if share == 1:
                part = cc.MultipartyDecryptLead([ct], keys[share])[0]
            else:
                part = cc.MultipartyDecryptMain([ct], keys[share])[0]
            items.append((share, self.context._serialize(part)))
        return _pack_partials(_digest(aggregate), items)

    def fuse(self, aggregate: bytes, partials: Iterable[bytes], *, length: int | None = None):
        """Fuse partial decryptions of ``aggregate`` (this party's own included).

        Refuses unless every key share 1..n contributed exactly once, all for these exact
        aggregate bytes. Returns a float64 vector of ``length`` (default: batch_size) values,
        accurate to :attr:`ThresholdContext.tolerance` per slot.
        """
        n = self.context.params.parties
        length = self.context.slots if length is None else int(length)
        if not 1 <= length <= self.context.slots:
            raise ThresholdError(f"length must be in 1..{self.context.slots}")
        digest = _digest(aggregate)
        by_share: dict[int, bytes] = {}
        for blob in partials:
            d, items = _unpack_partials(blob)
            if d != digest:
                raise ThresholdError("a partial decryption is of another ciphertext")
            for share, data in items:
                if share in by_share:
                    raise ThresholdError(f"key share {share} contributed twice")
                if not 1 <= share <= n:
                    raise ThresholdError(f"key share {share} is not in 1..{n}")
                by_share[share] = data
        missing = sorted(set(range(1, n + 1)) - set(by_share))
        if missing:
            raise ThresholdError(
                f"cannot decrypt: partial decryptions for key shares {missing} are missing; all "
                f"n={n} shares must contribute (recover a dropped hospital's share from "
                f"t={self.context.params.threshold} others with recover_key)"
            )
        cts = [self.context._ciphertext(by_share[k], f"partial {k}") for k in range(1, n + 1)]
        try:
            pt = self.context._cc.MultipartyDecryptFusion(cts)
        except RuntimeError as e:
            raise ThresholdError(f"fusion failed: {e}") from None
        pt.SetLength(length)
        return np.asarray(pt.GetRealPackedValue(), dtype=np.float64)

    def __repr__(self) -> str:
        return f"ThresholdParty(index={self.index}, key_shares={self.key_shares})"

    def __reduce__(self):
        raise TypeError("ThresholdParty holds a secret key share and cannot be pickled")
