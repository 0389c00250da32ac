"""The public CKKS context every party shares (:class:`ThresholdContext`, no key material).

It makes the OpenFHE crypto context from :class:`ThresholdParams`, measures the noise estimate
that sizes flooding (see "Noise flooding" in docs/threshold-protocol.md), serialises the context
with a JSON header, checks header and context agree when reading it back, and derives the
error bound and the largest value one hospital may encrypt.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from medfed.crypto.threshold.backend import _openfhe_version, _require_openfhe
from medfed.crypto.threshold.errors import ThresholdError, ThresholdParamsError
from medfed.crypto.threshold.params import ThresholdParams

#: Statistical security (bits) and adversarial queries OpenFHE 1.6.1 uses for CKKS flooding.
OPENFHE_STATISTICAL_SECURITY = 30
#: log2 of OpenFHE's flooding factor sqrt(12 * tau) * 2**(s/2) with tau = 1, s = 30.
_LOG2_FLOOD_FACTOR = OPENFHE_STATISTICAL_SECURITY / 2 + math.log2(math.sqrt(12.0))
#: OpenFHE's fixed partial-decryption smudging (NoiseFlooding::MP_SD = 2**20).
_FIXED_SMUDGING_STD = float(2**20)
#: OpenFHE (64-bit) refuses flooding when log2(sigma) exceeds 56 bits.
_MAX_FLOOD_BITS = 56.0

#: First bytes of :meth:`ThresholdContext.to_bytes`.
_CONTEXT_MAGIC = b"MFTHCTX1"


def _ccparams(params: ThresholdParams, *, estimation: bool, noise_estimate: float | None):
    """OpenFHE ``CCParamsCKKSRNS`` for ``params`` (noise estimation or evaluation mode)."""
    of = _require_openfhe()
    p = of.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(params.multiplicative_depth)
    p.SetScalingModSize(params.scaling_mod_size)
    p.SetBatchSize(params.batch_size)
    p.SetRingDim(params.ring_dim)
    p.SetSecurityLevel(of.HEStd_128_classic)
    p.SetScalingTechnique(of.FIXEDAUTO)
    p.SetKeySwitchTechnique(of.HYBRID if params.key_switching == "HYBRID" else of.BV)
    # the collective refresh (IntMPBoot) keeps 1 + 2 limbs: at depth 6 an epoch leaves that
    p.SetInteractiveBootCompressionLevel(of.CompressionLevel.COMPACT)
    if params.noise_flooding:
        p.SetDecryptionNoiseMode(of.NOISE_FLOODING_DECRYPT)
        if estimation:
            p.SetExecutionMode(of.EXEC_NOISE_ESTIMATION)
        else:
            p.SetExecutionMode(of.EXEC_EVALUATION)
            p.SetNoiseEstimate(float(noise_estimate))
    return p


def _enable(cc) -> None:
    """Enable the features the protocol uses: PKE, key switching, leveled SHE, multiparty."""
    of = _require_openfhe()
    for feature in (of.PKE, of.KEYSWITCH, of.LEVELEDSHE, of.MULTIPARTY):
        cc.Enable(feature)


def _make_cc(params: ThresholdParams, *, estimation: bool, noise_estimate: float | None):
    """An enabled OpenFHE crypto context; :class:`ThresholdParamsError` if OpenFHE refuses."""
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
    worst = _log_error(cc, keys, total)
    if params.multiplicative_depth >= 2:  # products: measure a chain as deep as the context
        worst = max(worst, _measure_products(cc, keys, params, rng))
    return worst


def _log_error(cc, keys, ct) -> float:
    """log2 of the error OpenFHE estimates for a fused decryption of ``ct`` with ``keys``."""
    partials = [cc.MultipartyDecryptLead([ct], keys[0].secretKey)[0]]
    partials += [cc.MultipartyDecryptMain([ct], k.secretKey)[0] for k in keys[1:]]
    return float(cc.MultipartyDecryptFusion(partials).GetLogError())


def _measure_products(cc, keys, params: ThresholdParams, rng) -> float:
    """The worst estimated error over a chain of products, relinearized, rotated and
    compressed for decryption as the aggregator does (throwaway joint evaluation keys)."""
    tag = keys[-1].publicKey.GetKeyTag()
    secrets = [k.secretKey for k in keys]
    switch = cc.KeySwitchGen(secrets[0], secrets[0])
    cc.EvalAtIndexKeyGen(secrets[0], [1])
    rotations = cc.GetEvalAutomorphismKeyMap(secrets[0].GetKeyTag())
    for sk in secrets[1:]:
        switch = cc.MultiAddEvalKeys(switch, cc.MultiKeySwitchGen(sk, sk, switch), tag)
        rotations = cc.MultiAddEvalAutomorphismKeys(
            rotations, cc.MultiEvalAtIndexKeyGen(sk, rotations, [1], tag), tag
        )
    cc.InsertEvalAutomorphismKey(rotations, tag)
    mult = None
    for sk in secrets:
        part = cc.MultiMultEvalKey(sk, switch, tag)
        mult = part if mult is None else cc.MultiAddEvalMultKeys(mult, part, tag)
    cc.InsertEvalMultKey([mult])
    joint = keys[-1].publicKey

    def fresh():
        x = rng.uniform(-1.0, 1.0, size=params.batch_size).tolist()
        return cc.Encrypt(joint, cc.MakeCKKSPackedPlaintext(x))

    worst, ct = -math.inf, fresh()
    for _ in range(params.multiplicative_depth):
        ct = cc.EvalRotate(cc.EvalMult(ct, fresh()), 1)
        worst = max(worst, _log_error(cc, keys, compress_for_decryption(cc, ct)))
    return worst


def compress_for_decryption(cc, ct, towers: int = 2):
    """``ct`` rescaled to degree 1 and cut to at most ``towers`` RNS limbs (``Compress``): the
    only form parties partially decrypt (flooding sized for scale ``2^p`` does not hide a
    degree-2 message's noise)."""
    left = cc.GetMultiplicativeDepth() + 1 - ct.GetLevel() - (ct.GetNoiseScaleDeg() - 1)
    return cc.Compress(ct, max(1, min(towers, left)))


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
        """Measure the noise estimate (with flooding) and make the context for ``params``."""
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
        """Read :meth:`to_bytes` back; :class:`ThresholdError` if malformed or inconsistent."""
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
        """Magic, JSON header (params, noise estimate, OpenFHE version), OpenFHE context."""
        return self._bytes

    @property
    def slots(self) -> int:
        """Slots per ciphertext: the longest vector one ciphertext carries."""
        return self.params.batch_size

    @property
    def scale_bits(self) -> float:
        """log2 of the CKKS scaling factor at level 0."""
        return math.log2(self._cc.GetScalingFactorReal(0))

    @property
    def modulus_bits(self) -> float:
        """log2 of the full ciphertext modulus Q."""
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
        """Public parameters and derived precision figures, for run metadata."""
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
        """Deserialise a ciphertext of this context; :class:`ThresholdError` names ``what``."""
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
        """OpenFHE binary serialisation of ``obj``."""
        of = _require_openfhe()
        return of.Serialize(obj, of.BINARY)
