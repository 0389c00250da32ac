"""The aggregator's side of the threshold setup (:class:`ThresholdAggregator`): it adds.

It holds the public context and, optionally, the joint public key's tag; it never holds key
material, partial decryptions or plaintexts.
"""

from __future__ import annotations

from collections.abc import Sequence

from medfed.crypto.threshold.backend import _require_openfhe
from medfed.crypto.threshold.context import ThresholdContext, compress_for_decryption
from medfed.crypto.threshold.errors import ThresholdError
from medfed.crypto.threshold.wire import (
    _deserialize_public_key,
    deserialize_eval_key,
    unpack_eval_share,
    unpack_refresh_shares,
)


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
        self.joint_public_key = None  # the OpenFHE key (public), for re-encryption
        if joint_public_key is not None:
            self.joint_public_key = _deserialize_public_key(joint_public_key)
            self.joint_key_tag = self.joint_public_key.GetKeyTag()

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

    # --- joint evaluation keys ---------------------------------------------------------------

    def join_eval_key_shares(self, shares: Sequence[bytes]) -> bytes:
        """Round A: fold every party's :meth:`ThresholdParty.eval_key_share` (all n, party 1's
        first); the joint rotation keys go into this context, and the joint key-switching key
        returned goes to every party for round B. Called once per chunk of steps, the
        rotation keys add up (any one chunk's key-switching key serves round B)."""
        cc, tag = self.context._cc, self._need_tag()
        if len(shares) != self.context.params.parties:
            raise ThresholdError(
                f"the evaluation keys need every key share: got {len(shares)} of "
                f"{self.context.params.parties} (a party that drops out here aborts the setup)"
            )
        parts = [unpack_eval_share(b) for b in shares]
        if len({tuple(steps) for *_, steps in parts}) != 1:
            raise ThresholdError("the parties' evaluation-key shares are for different steps")
        switch, rotations, _ = parts[0]
        try:
            for other_switch, other_rotations, _ in parts[1:]:
                switch = cc.MultiAddEvalKeys(switch, other_switch, tag)
                rotations = cc.MultiAddEvalAutomorphismKeys(rotations, other_rotations, tag)
            cc.InsertEvalAutomorphismKey(rotations, tag)
        except RuntimeError as e:
            raise ThresholdError(f"cannot join the evaluation-key shares: {e}") from None
        # several rounds A (steps in chunks, to keep messages small) add up their rotations
        self.rotation_steps = sorted(set(getattr(self, "rotation_steps", ())) | set(parts[0][2]))
        return self.context._serialize(switch)

    def join_mult_key_shares(self, shares: Sequence[bytes]) -> None:
        """Round B: fold every key share's :meth:`ThresholdParty.mult_key_share` into the
        joint relinearization key of this context."""
        cc, tag = self.context._cc, self._need_tag()
        if len(shares) != self.context.params.parties:
            raise ThresholdError(
                f"the relinearization key needs every key share: got {len(shares)} of "
                f"{self.context.params.parties} (a recovered share counts for its owner)"
            )
        keys = [deserialize_eval_key(b, f"relinearization share {i}") for i, b in enumerate(shares)]
        try:
            joint = keys[0]
            for key in keys[1:]:
                joint = cc.MultiAddEvalMultKeys(joint, key, tag)
            cc.InsertEvalMultKey([joint])
        except RuntimeError as e:
            raise ThresholdError(f"cannot join the relinearization shares: {e}") from None

    def for_decryption(self, ciphertext: bytes, towers: int = 2) -> bytes:
        """A computed ciphertext made fit for partial decryption: rescaled to degree 1 and cut
        to at most ``towers`` RNS limbs (``Compress``); parties refuse anything else."""
        ct = self.context._ciphertext(ciphertext, "ciphertext")
        return self.context._serialize(compress_for_decryption(self.context._cc, ct, towers))

    # --- collective refresh --------------------------------------------------------------

    def refresh_input(self, ciphertext: bytes) -> tuple[object, bytes]:
        """Start a collective refresh of ``ciphertext``: the adjusted ciphertext (kept) and
        its ``c1`` part, which goes to every party."""
        cc = self.context._cc
        ct = self.context._ciphertext(ciphertext, "ciphertext to refresh")
        try:
            adjusted = cc.IntMPBootAdjustScale(ct)
        except RuntimeError as e:
            raise ThresholdError(f"cannot refresh this ciphertext: {e}") from None
        c1 = adjusted.Clone()
        c1.RemoveElement(0)
        return adjusted, self.context._serialize(c1)

    def refresh_output(self, adjusted, a: bytes, shares: Sequence[bytes]) -> bytes:
        """Finish the refresh: every key share's shares (exactly once each) summed and
        re-encrypted under the joint key at the top level (``IntMPBootEncrypt``)."""
        cc = self.context._cc
        found: dict[int, tuple[bytes, bytes]] = {}
        for blob in shares:
            for k, pair in unpack_refresh_shares(blob).items():
                if k in found:
                    raise ThresholdError(f"key share {k} took part twice in the refresh")
                found[k] = pair
        missing = sorted(set(range(1, self.context.params.parties + 1)) - set(found))
        if missing:
            raise ThresholdError(
                f"the refresh needs every key share; missing {missing} (fewer than t hospitals "
                "remain to recover them)"
            )
        ct = self.context._ciphertext
        pairs = [[ct(h0, f"h0 of share {k}"), ct(h1, f"h1 of share {k}")] for k, (h0, h1) in
                 sorted(found.items())]  # fmt: skip
        try:
            summed = cc.IntMPBootAdd(pairs)
            out = cc.IntMPBootEncrypt(
                self.joint_public_key, summed, ct(a, "refresh element"), adjusted
            )
        except RuntimeError as e:
            raise ThresholdError(f"cannot finish the refresh: {e}") from None
        return self.context._serialize(out)

    def _need_tag(self) -> str:
        if self.joint_key_tag is None:
            raise ThresholdError("the aggregator needs the joint public key first")
        return self.joint_key_tag
