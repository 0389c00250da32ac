"""One hospital's side of the threshold setup (:class:`ThresholdParty`).

Key-chain generation, Shamir sharing and recovery of key shares, encryption under the joint
key, flooded partial decryption and fusion; hospital-to-hospital messages are sealed with
:mod:`medfed.crypto.channel`. The steps in order: docs/threshold-protocol.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medfed.crypto.channel import Identity, channel_context, open_sealed, seal
from medfed.crypto.threshold.backend import _require_openfhe
from medfed.crypto.threshold.context import ThresholdContext
from medfed.crypto.threshold.errors import ThresholdBudgetError, ThresholdError
from medfed.crypto.threshold.wire import (
    PURPOSE_KEY_SHARE,
    PURPOSE_PARTIAL,
    PURPOSE_RECOVERY_SHARE,
    PURPOSE_REFRESH,
    _deserialize_public_key,
    _digest,
    _pack_partials,
    _pack_share,
    _unpack_partials,
    _unpack_share,
    check_steps,
    deserialize_eval_key,
    pack_blobs,
    pack_eval_share,
    pack_refresh_shares,
    unpack_blobs,
    unpack_eval_share,
)

_STATE_MAGIC = b"MFTP1"


class ThresholdParty:
    """One hospital's side: its key share, Shamir shares it holds, and the decrypt flow.

    The key share never leaves this object except as OpenFHE ``ShareKeys`` outputs sealed to
    one recipient each. The object refuses to be pickled.

    The decryption budget: the flooding noise is sized for ``params.max_decryptions`` partial
    decryptions under one key share (OpenFHE's tau). The party counts every partial
    decryption it actually makes, per key share it holds (:attr:`decryptions`), and refuses
    the one beyond the budget (:class:`ThresholdBudgetError`), whatever the aggregator asks.

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
        self._decryptions: dict[int, int] = {}  # key share -> partial decryptions made with it
        self._refreshes = 0

    # --- identity / directory -----------------------------------------------------------------

    @property
    def public_bundle(self) -> bytes:
        """This hospital's channel public keys, for the other hospitals' :meth:`set_peers`."""
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
        """Adopt the key chain's last output (party n's :meth:`keygen`) as the joint key."""
        self._joint = _deserialize_public_key(joint_public_key)
        self._joint_bytes = bytes(joint_public_key)

    @property
    def joint_public_key(self) -> bytes:
        """The joint public key's bytes; :class:`ThresholdError` before it is known."""
        if self._joint_bytes is None:
            raise ThresholdError("the joint public key is not known yet")
        return self._joint_bytes

    # --- joint evaluation keys: relinearization and rotations (two rounds) ---------------------

    def eval_key_share(self, steps: Sequence[int], lead: bytes | None = None) -> bytes:
        """Round A: this party's share of the joint key-switching key (the relinearization
        key's base) and of the joint rotation keys for ``steps``.

        Party 1 passes no ``lead``; its output is the lead every other party passes (they use
        only its public random parts, so they answer in parallel). The aggregator folds all n
        outputs (:meth:`ThresholdAggregator.join_eval_key_shares`). Every key share takes
        part: a dropout here aborts the setup, as in the key chain.
        """
        cc, secret = self.context._cc, self._need_secret()
        steps = check_steps(steps, self.context.slots)
        if self.index == 1:
            if lead is not None:
                raise ThresholdError("party 1 leads the evaluation keys: pass no lead")
            switch = cc.KeySwitchGen(secret, secret)
            cc.EvalAtIndexKeyGen(secret, steps)
            rotations = cc.GetEvalAutomorphismKeyMap(secret.GetKeyTag())
        else:
            if lead is None:
                raise ThresholdError(f"party {self.index} needs party 1's evaluation-key share")
            lead_switch, lead_rotations, lead_steps = unpack_eval_share(lead)
            if lead_steps != steps:
                raise ThresholdError(
                    f"party 1's rotation steps {lead_steps} are not the steps asked {steps}"
                )
            tag = self._joint_tag()
            switch = cc.MultiKeySwitchGen(secret, secret, lead_switch)
            rotations = cc.MultiEvalAtIndexKeyGen(secret, lead_rotations, steps, tag)
        return pack_eval_share(switch, rotations, steps)

    def mult_key_share(self, joint_switch_key: bytes, share: int | None = None) -> bytes:
        """Round B: this party's share of the joint relinearization key, from round A's joint
        key-switching key; ``share``: a key share it recovered for a dropped party instead of
        its own (so the round survives dropouts after round A)."""
        cc = self.context._cc
        if share is None or share == self.index:
            key = self._need_secret()
        elif share in self._recovered:
            key = self._recovered[share]
        else:
            raise ThresholdError(f"party {self.index} holds no key share {share}")
        joint = deserialize_eval_key(joint_switch_key, "the joint key-switching key")
        return self.context._serialize(cc.MultiMultEvalKey(key, joint, self._joint_tag()))

    # --- collective refresh (OpenFHE's interactive multiparty bootstrapping) -------------------

    def refresh_element(self, *, round: int) -> tuple[bytes, dict[int, bytes]]:
        """The refresh's lead (party 1, or the lowest party still online), once per refresh:
        a fresh common random element ``a`` and, sealed to each other party, its SHA-256
        digest. ``a`` must not come from the aggregator: with ``a = 0`` the shares would add up
        to a decryption."""
        if self._joint is None:
            raise ThresholdError("the joint public key is not known yet")
        a = self.context._serialize(self.context._cc.IntMPBootRandomElementGen(self._joint))
        digest = _digest(a)
        sealed = {
            j: self.seal_to(j, digest, round=round, purpose=PURPOSE_REFRESH)
            for j in range(1, self.context.params.parties + 1)
            if j != self.index
        }
        return a, sealed

    def refresh_shares(
        self,
        c1: bytes,
        a: bytes,
        *,
        round: int,
        sealed_digest: bytes | None = None,
        lead: int = 1,
    ) -> bytes:
        """This party's shares of a collective refresh (``IntMPBootDecrypt``) for every key
        share it holds: a masked decryption share and a re-encryption share under ``a``.

        Parties other than the ``lead`` (the party that made ``a``) pass its
        ``sealed_digest`` of ``a``, and refuse an ``a`` that is not the one it made (the
        aggregator relays both).
        """
        self._need_secret()
        if self.index != lead:
            if sealed_digest is None:
                raise ThresholdError(
                    f"the refresh needs party {lead}'s sealed digest of its element"
                )
            expected = self.open_from(lead, sealed_digest, round=round, purpose=PURPOSE_REFRESH)
            if expected != _digest(a):
                raise ThresholdError(
                    f"the refresh's common random element is not the one party {lead} made"
                )
        cc = self.context._cc
        c1_ct = self.context._ciphertext(c1, "refresh input")
        a_ct = self.context._ciphertext(a, "refresh element")
        keys = {self.index: self._secret, **self._recovered}
        out = {}
        for share in sorted(keys):
            h0, h1 = cc.IntMPBootDecrypt(keys[share], c1_ct, a_ct)
            out[share] = (self.context._serialize(h0), self.context._serialize(h1))
        self._refreshes += 1
        return pack_refresh_shares(out)

    @property
    def refreshes(self) -> int:
        """Collective refreshes this party took part in."""
        return self._refreshes

    def _joint_tag(self) -> str:
        if self._joint is None:
            raise ThresholdError("the joint public key is not known yet")
        return self._joint.GetKeyTag()

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
                payload = _pack_share(self.context, self.index, j, shares[j], box)
                out[j] = self.seal_to(j, payload, round=round, purpose=PURPOSE_KEY_SHARE)
        return out

    def accept_key_share(self, sender: int, sealed: bytes, *, round: int = 0) -> None:
        """Keep the Shamir share of ``sender``'s key that ``sender`` sealed to this party."""
        payload = self.open_from(sender, sealed, round=round, purpose=PURPOSE_KEY_SHARE)
        owner, holder, poly = _unpack_share(self.context, payload)
        if owner != sender or holder != self.index:
            raise ThresholdError(f"key share is for ({owner}->{holder}), not ({sender}->me)")
        self._held[owner] = poly

    def recovery_share(self, dropped: int, recoverer: int, *, round: int) -> bytes:
        """Hand this party's share of ``dropped``'s key to ``recoverer``, sealed."""
        if dropped not in self._held:
            raise ThresholdError(f"party {self.index} holds no share of party {dropped}'s key")
        payload = _pack_share(
            self.context, dropped, self.index, self._held[dropped], self._share_container()
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
            owner, holder, poly = _unpack_share(self.context, payload)
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
        # the dropped party's own count is not visible here; every decryption needs all n
        # shares, so it took part in at most the decryptions this party made with its own
        self._decryptions[dropped] = self._decryptions.get(self.index, 0)

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
        if ct.GetNoiseScaleDeg() != 1 or ct.NumberCiphertextElements() != 2:
            raise ThresholdError(  # a product: flooding sized for scale 2^p does not hide
                f"aggregate is at scaling degree {ct.GetNoiseScaleDeg()} with "  # it at 2^(2p)
                f"{ct.NumberCiphertextElements()} elements (a product that was not rescaled "
                "and relinearized); only degree-1, two-element ciphertexts are decrypted"
            )
        cc = self.context._cc
        keys = {self.index: self._secret, **self._recovered}
        self._check_budget(keys)
        items = []
        for share in sorted(keys):
            if share == 1:
                part = cc.MultipartyDecryptLead([ct], keys[share])[0]
            else:
                part = cc.MultipartyDecryptMain([ct], keys[share])[0]
            self._decryptions[share] = self._decryptions.get(share, 0) + 1  # made: it counts
            items.append((share, self.context._serialize(part)))
        return _pack_partials(_digest(aggregate), items)

    def _check_budget(self, shares: Iterable[int]) -> None:
        """:class:`ThresholdBudgetError` if a partial decryption with any of ``shares`` would
        go beyond ``max_decryptions``."""
        budget = self.context.params.max_decryptions
        spent = {s: self._decryptions.get(s, 0) for s in shares}
        over = sorted(s for s, used in spent.items() if used >= budget)
        if over:
            raise ThresholdBudgetError(
                f"party {self.index}: key share {over[0]} has made {spent[over[0]]} partial "
                f"decryptions, the {budget} the noise flooding was sized for (max_decryptions, "
                "OpenFHE's tau); one more would weaken its statistical hiding of the key, so it "
                "is refused. Make fresh keys (a new key setup), or a context with a larger "
                "max_decryptions (each doubling costs half a bit of precision)."
            )

    @property
    def decryptions(self) -> dict[int, int]:
        """Partial decryptions made so far, per key share this party holds (a recovered share
        starts at this party's own count when it is recovered)."""
        return {s: self._decryptions.get(s, 0) for s in self.key_shares}

    @property
    def decryptions_left(self) -> int:
        """Partial decryptions this party can still make before :class:`ThresholdBudgetError`:
        ``max_decryptions`` minus the count of its most-used key share."""
        used = max(self.decryptions.values(), default=0)
        return self.context.params.max_decryptions - used

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

    # --- state at rest ---------------------------------------------------------------------

    def secret_state(self) -> bytes:
        """Everything this party holds, secrets included, as bytes for its owner to store
        encrypted (``medfed.fl.ciphers.threshold`` seals them with AES-GCM): the context,
        channel keys, key share, Shamir shares held, recovered shares and decryption counts.
        Never send these bytes anywhere."""
        ctx = self.context
        box = self._share_container() if self._own_public is not None else None
        blobs = {
            "context": ctx.to_bytes(),
            "identity": self._identity.private_bytes(),
            **{f"peer/{j}": b for j, b in self._peers.items()},
            **({"secret": ctx._serialize(self._secret)} if self._secret is not None else {}),
            **({"public": ctx._serialize(self._own_public)} if box is not None else {}),
            **({"joint": self._joint_bytes} if self._joint_bytes is not None else {}),
            **{f"held/{o}": _pack_share(ctx, o, self.index, p, box) for o, p in self._held.items()},
            **{f"recovered/{d}": ctx._serialize(k) for d, k in self._recovered.items()},
        }
        header = {
            "index": self.index,
            "run_id": self.run_id,
            "decryptions": {str(k): v for k, v in self._decryptions.items()},
        }
        return pack_blobs(_STATE_MAGIC, header, blobs)

    @staticmethod
    def secret_parts(data: bytes) -> dict[str, bytes]:
        """The secret pieces of a :meth:`secret_state` (key share, Shamir shares held,
        recovered shares, channel identity), by name, read without OpenFHE: what an auditor
        looks for in another process's memory."""
        _, blobs = _split_state(data)
        secret = ("secret", "identity", "held/", "recovered/")
        return {k: v for k, v in blobs.items() if k.startswith(secret)}

    @classmethod
    def from_secret_state(cls, data: bytes) -> ThresholdParty:
        """The party :meth:`secret_state` wrote; :class:`ThresholdError` if malformed."""
        of = _require_openfhe()
        header, blobs = _split_state(data)
        context = ThresholdContext.from_bytes(blobs["context"])
        party = cls(
            context,
            int(header["index"]),
            Identity.from_private_bytes(blobs["identity"]),
            run_id=str(header["run_id"]),
        )
        party._peers = {int(n[5:]): b for n, b in blobs.items() if n.startswith("peer/")}
        if "secret" in blobs:
            party._secret = of.DeserializePrivateKeyString(blobs["secret"], of.BINARY)
        if "public" in blobs:
            party._own_public = _deserialize_public_key(blobs["public"])
        if "joint" in blobs:
            party.set_joint_public_key(blobs["joint"])
        for name, blob in blobs.items():
            if name.startswith("held/"):
                owner, _, poly = _unpack_share(context, blob)
                party._held[owner] = poly
            elif name.startswith("recovered/"):
                key = of.DeserializePrivateKeyString(blob, of.BINARY)
                party._recovered[int(name[10:])] = key
        party._decryptions = {int(k): int(v) for k, v in header["decryptions"].items()}
        return party

    def __repr__(self) -> str:
        return f"ThresholdParty(index={self.index}, key_shares={self.key_shares})"

    def __reduce__(self):
        raise TypeError("ThresholdParty holds a secret key share and cannot be pickled")


def _split_state(data: bytes) -> tuple[dict, dict[str, bytes]]:
    """(header, blobs by name) of a :meth:`ThresholdParty.secret_state`."""
    return unpack_blobs(_STATE_MAGIC, data, "threshold party state")
