"""The aggregator's side of the threshold setup (:class:`ThresholdAggregator`): it adds.

It holds the public context and, optionally, the joint public key's tag; it never holds key
material, partial decryptions or plaintexts.
"""

from __future__ import annotations

from collections.abc import Sequence

from medfed.crypto.threshold.backend import _require_openfhe
from medfed.crypto.threshold.context import ThresholdContext
from medfed.crypto.threshold.errors import ThresholdError
from medfed.crypto.threshold.wire import _deserialize_public_key


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
