"""Key setup ``threshold``, the hospital's side: a :class:`ThresholdHospital` wraps this
hospital's :class:`~medfed.crypto.threshold.ThresholdParty` (its key share), answers the
key-setup chain and the partial-decryption rounds, and insists on flooded partial
decryptions whatever the aggregator asks. It signs its channel bundle and its link of the key
chain, and accepts the other hospitals' only with their signatures under the keys pinned at
provisioning (:mod:`.endorse`), so an aggregator that swaps one is caught.

A hospital's state (its key share and everything else its ThresholdParty holds, the pending
partial decryptions) is stored after every step that changes it, encrypted at rest
(:mod:`.at_rest`), and reloaded by any process that serves the hospital next: a Flower
simulation actor or a deployment's per-message ``flwr-clientapp``. Within one process the
cipher object is kept (:data:`_THRESHOLD_PARTIES`) and reloads only when another process has
changed the file. OpenFHE is imported only when a cipher is set up.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medfed.crypto.errors import CiphertextError, KeyMaterialError
from medfed.crypto.threshold.errors import ThresholdError
from medfed.crypto.threshold.wire import pack_blobs, unpack_blobs
from medfed.fl import messages as M
from medfed.fl.ciphers.base import HospitalCipher
from medfed.fl.ciphers.framing import chunk_sizes, chunks, frame, unframe
from medfed.fl.ciphers.threshold import at_rest
from medfed.fl.ciphers.threshold.endorse import (
    BUNDLE,
    KEY_CHAIN,
    check_endorsement,
    check_peers,
    endorse,
)

#: Hospitals' threshold ciphers in this process, by (workspace, hospital index); the state of
#: record is the hospital's encrypted state file (:mod:`.at_rest`).
_THRESHOLD_PARTIES: dict[tuple[str, int], ThresholdHospital] = {}
_LOCK = threading.Lock()


def forget_threshold_parties(workspace: str | Path) -> None:
    """Drop the key shares of every hospital of ``workspace`` (end of a run)."""
    with _LOCK:
        for key in [k for k in _THRESHOLD_PARTIES if k[0] == str(workspace)]:
            del _THRESHOLD_PARTIES[key]


class ThresholdHospital(HospitalCipher):
    """keys "threshold": this hospital's :class:`~medfed.crypto.threshold.ThresholdParty`."""

    collective = True
    #: The flooding noise of a threshold decryption is absolute (~0.007 per slot at the
    #: training preset): PCA whitening of near-degenerate embeddings amplifies an error of that
    #: size in the covariance into another feature map (measured on BreastMNIST: +-2 pp of
    #: accuracy). Scaled by 2^20 the error is ~1e-8, far inside the contexts' headroom.
    stats_scale = 2.0**20

    def __init__(self, workspace: str, index: int) -> None:
        self.workspace, self.index = workspace, index
        self.party = None
        self.session = ""
        self._previous: str | None = None  # the hospital whose key-chain link this one extends
        self._pending: tuple[bytes, list[bytes]] | None = None  # last aggregate, own partials
        self._lead_context = None  # the lead hospital's context, until it joins
        self._stamp: tuple[int, int] | None = None  # the state file this object reflects

    @classmethod
    def for_hospital(cls, workspace: str, index: int) -> ThresholdHospital:
        """This hospital's cipher in this process, up to date with its stored state."""
        with _LOCK:
            key = (str(workspace), int(index))
            if key not in _THRESHOLD_PARTIES:
                _THRESHOLD_PARTIES[key] = cls(str(workspace), int(index))
            cipher = _THRESHOLD_PARTIES[key]
        cipher._sync()
        return cipher

    # --- state at rest ----------------------------------------------------------------------

    def _sync(self) -> None:
        """Reload the stored state if another process changed it since this one saw it."""
        stamp = at_rest.stamp(self.workspace, self.index)
        if stamp is None or stamp == self._stamp:
            return
        from medfed.crypto.threshold import ThresholdContext, ThresholdParty

        state = _unpack(at_rest.load(self.workspace, self.index))
        header, blobs = state
        self.session = header["session"]
        self._previous = header["previous"]
        self.party = ThresholdParty.from_secret_state(blobs["party"]) if "party" in blobs else None
        lead = blobs.get("lead_context")
        self._lead_context = ThresholdContext.from_bytes(lead) if lead else None
        own = [blobs[f"own/{k}"] for k in range(header["own"])]
        self._pending = (blobs["aggregate"], own) if "aggregate" in blobs else None
        self._stamp = stamp

    def _save(self) -> None:
        """Store this hospital's whole state, encrypted at rest."""
        blobs: dict[str, bytes] = {}
        if self.party is not None:
            blobs["party"] = self.party.secret_state()
        if self._lead_context is not None:
            blobs["lead_context"] = self._lead_context.to_bytes()
        own: list[bytes] = []
        if self._pending is not None:
            blobs["aggregate"], own = self._pending
            blobs.update({f"own/{k}": b for k, b in enumerate(own)})
        header = {"session": self.session, "previous": self._previous, "own": len(own)}
        self._stamp = at_rest.store(self.workspace, self.index, _pack(header, blobs))

    def _need_party(self):
        if self.party is None:
            raise KeyMaterialError(
                f"hospital {self.index} has no threshold key share: it did not take part in "
                "this run's key setup (or its state file was removed)"
            )
        return self.party

    def _signing_key(self):
        from medfed.fl.workspace import load_signing_key

        return load_signing_key(self.workspace, self.index)

    def setup(self, step: str, record: Mapping) -> dict:
        """Steps context (lead only), join, keygen, share, accept, recovery_share, recover,
        and for training on the joint keys eval_keys and mult_key; the state is stored after
        each."""
        out = self._setup(step, record)
        self._save()
        return out

    def _setup(self, step: str, record: Mapping) -> dict:
        from medfed.crypto.threshold import ThresholdContext, ThresholdParams, ThresholdParty

        if step == "context":  # the lead hospital makes the public context (no key in it)
            params = ThresholdParams(**json.loads(record[M.THRESHOLD_CONTEXT]))  # validated
            _hospital_policy(params)
            self._lead_context = ThresholdContext.generate(params)
            return {M.THRESHOLD_CONTEXT: self._lead_context.to_bytes()}
        if step == "join":
            raw = bytes(record[M.THRESHOLD_CONTEXT])
            lead = getattr(self, "_lead_context", None)
            context = lead if lead is not None and lead.to_bytes() == raw else None
            context = context or ThresholdContext.from_bytes(raw)
            self._lead_context = None
            _hospital_policy(context.params)
            key = self._signing_key()
            self.session = str(record[M.SESSION])
            self.party = ThresholdParty(context, int(record[M.PARTY]), run_id=self.session)
            bundle = self.party.public_bundle
            return {
                M.BUNDLE: bundle,
                M.PARTY: self.party.index,
                M.ENDORSEMENT: endorse(key, BUNDLE, self.session, self.party.index, bundle),
            }
        party = self._need_party()
        key = self._signing_key()
        if step == "keygen":
            previous = record.get(M.PUBLIC_KEY)
            if previous:  # party k extends party k-1's link, endorsed by its holder
                self._previous = str(record[M.SIGNER])
                endorsed = bytes(record[M.ENDORSEMENT])
                args = (KEY_CHAIN, self.session, party.index - 1, bytes(previous))
                check_endorsement(key.pinned, self._previous, endorsed, *args)
            out = party.keygen(bytes(previous) if previous else None)
            signature = endorse(key, KEY_CHAIN, self.session, party.index, out)
            return {M.PUBLIC_KEY: out, M.ENDORSEMENT: signature}
        if step == "share":
            signers = [str(s) for s in record[M.SIGNERS]]
            peers = check_peers(
                key.pinned,
                own=key.name,
                party=party.index,
                session=self.session,
                bundles=[bytes(b) for b in record[M.PEERS]],
                endorsements=[bytes(e) for e in record[M.ENDORSEMENTS]],
                signers=signers,
            )
            if party.index > 1 and signers[party.index - 2] != self._previous:
                raise KeyMaterialError("the key chain and the bundles name other hospitals")
            joint = bytes(record[M.PUBLIC_KEY])  # the last link, endorsed by party n's holder
            n = len(signers)
            args = (KEY_CHAIN, self.session, n, joint)
            check_endorsement(key.pinned, signers[-1], bytes(record[M.ENDORSEMENT]), *args)
            party.set_peers(peers)
            party.set_joint_public_key(joint)
            sealed = party.share_key()
            recipients = sorted(sealed)
            return {M.RECIPIENTS: recipients, M.SEALED: [sealed[r] for r in recipients]}
        if step == "accept":
            for sender, blob in zip(record[M.SENDERS], record[M.SEALED], strict=True):
                party.accept_key_share(int(sender), bytes(blob))
            return {M.OK: 1}
        if step == "recovery_share":
            blob = party.recovery_share(
                int(record[M.DROPPED]), int(record[M.RECOVERER]), round=int(record[M.STEP])
            )
            return {M.SEALED: [blob]}
        if step == "recover":
            shares = {
                int(s): bytes(b) for s, b in zip(record[M.SENDERS], record[M.SEALED], strict=True)
            }
            party.recover_key(int(record[M.DROPPED]), shares, round=int(record[M.STEP]))
            return {M.OK: 1}
        if step == "eval_keys":  # round A of the joint evaluation keys (mode "embeddings")
            lead = record.get(M.LEAD_SHARE)
            steps = [int(k) for k in record[M.STEPS]]
            return {M.SHARE: party.eval_key_share(steps, bytes(lead) if lead else None)}
        if step == "mult_key":  # round B: one share per key share this party answers for
            switch = bytes(record[M.SWITCH_KEY])
            held = set(party.key_shares)
            asked = [int(k) for k in record[M.KEY_SHARES]]
            if not asked or not set(asked) <= held:
                raise KeyMaterialError(
                    f"asked for relinearization shares of key shares {asked}; this hospital "
                    f"holds {sorted(held)}"
                )
            return {M.SHARES: [party.mult_key_share(switch, share=k) for k in asked]}
        return super().setup(step, record)

    def encrypt(self, vector: np.ndarray) -> bytes:
        """The vector under the joint public key, framed over ciphertexts of the context's slots."""
        party = self._need_party()
        return frame([party.encrypt(c) for c in chunks(vector, party.context.slots)])

    def encrypt_each(self, vectors: Sequence[np.ndarray]) -> list[bytes]:
        """Each slot vector as one ciphertext under the joint public key."""
        party = self._need_party()
        return [party.encrypt(v) for v in vectors]

    # --- collective refresh (mode "embeddings") ----------------------------------------------

    def refresh_elements(self, count: int, first_round: int) -> dict:
        """As the refresh's lead: ``count`` fresh common random elements and, for every other
        party, the digests of all of them sealed to it (one frame per recipient)."""
        party = self._need_party()
        if not 1 <= count <= 4096:
            raise ValueError(f"asked for {count} refresh elements")
        made = [party.refresh_element(round=first_round + k) for k in range(count)]
        others = sorted(made[0][1])
        return {
            M.ELEMENTS: [a for a, _ in made],
            M.RECIPIENTS: others,
            M.SEALED: [frame([sealed[r] for _, sealed in made]) for r in others],
        }

    def refresh_shares(self, record: Mapping) -> dict:
        """This hospital's refresh shares (every key share it holds) for each ``c1``, after
        checking each element against the lead's sealed digest."""
        party = self._need_party()
        c1s, elements = list(record[M.C1]), list(record[M.ELEMENTS])
        if len(c1s) != len(elements) or not c1s:
            raise CiphertextError(f"{len(c1s)} ciphertexts to refresh but {len(elements)} elements")
        lead, first = int(record[M.LEAD]), int(record[M.STEP])
        if lead == party.index:
            digests = [None] * len(c1s)
        else:
            digests = unframe(bytes(record[M.SEALED]), sender="the refresh's lead", item="digests")
            if len(digests) != len(c1s):
                raise CiphertextError(f"{len(digests)} sealed digests for {len(c1s)} elements")
        shares = [
            party.refresh_shares(
                bytes(c1), bytes(a), round=first + k, sealed_digest=digests[k], lead=lead
            )
            for k, (c1, a) in enumerate(zip(c1s, elements, strict=True))
        ]
        return {M.SHARES: shares}

    def partials(self, aggregate: bytes, recipients: Sequence[int], seal_round: int) -> dict:
        """This hospital's flooded partial decryptions of ``aggregate``, sealed to each peer."""
        party = self._need_party()
        parts = unframe(aggregate, sender="aggregator", item="aggregate")
        own = [party.partial_decrypt(p) for p in parts]  # flooded; secret-bearing
        self._pending = (bytes(aggregate), own)
        self._save()  # the decryption counts and the pending partials
        envelope = frame(own)
        others = [int(r) for r in recipients if int(r) != party.index]
        return {
            M.RECIPIENTS: others,
            M.SEALED: [party.seal_to(r, envelope, round=seal_round) for r in others],
        }

    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        """Fuses own and the peers' (sealed) partial decryptions of the pending aggregate."""
        party = self._need_party()
        if self._pending is None:
            raise ValueError("no partial-decryption round preceded this decryption")
        pending, own = self._pending
        if aggregate is not None and bytes(aggregate) != pending:
            raise ValueError("the aggregate differs from the one partially decrypted")
        seal_round = int(record[M.STEP])
        theirs = [
            unframe(party.open_from(int(s), bytes(b), round=seal_round), item="partials")
            for s, b in zip(record[M.SENDERS], record[M.SEALED], strict=True)
        ]
        parts = unframe(pending, sender="aggregator", item="aggregate")
        sizes = chunk_sizes(length, party.context.slots)
        if len(parts) != len(sizes) or any(len(t) != len(parts) for t in theirs):
            raise CiphertextError("the aggregate and the partial decryptions do not match")
        out = [
            party.fuse(parts[k], [own[k], *(t[k] for t in theirs)], length=sizes[k])
            for k in range(len(parts))
        ]
        self._pending = None
        self._save()
        return np.concatenate(out)[:length]


def _hospital_policy(params) -> None:
    """What a hospital insists on, whatever the aggregator asks: flooded partial decryptions."""
    if not params.noise_flooding:
        raise KeyMaterialError("refusing threshold parameters without noise flooding")


_STATE_MAGIC = b"MFTH1"


def _pack(header: dict, blobs: dict[str, bytes]) -> bytes:
    return pack_blobs(_STATE_MAGIC, header, blobs)


def _unpack(data: bytes | None) -> tuple[dict, dict[str, bytes]]:
    try:
        return unpack_blobs(_STATE_MAGIC, data or b"", "threshold hospital state")
    except ThresholdError as e:
        raise KeyMaterialError(str(e)) from None


def stored_secrets(workspace: str | Path, index: int) -> dict[str, bytes]:
    """The secret pieces of hospital ``index``'s stored threshold state (none without one):
    its key share, the Shamir shares it holds, its channel identity. For audits only."""
    from medfed.crypto.threshold.party import ThresholdParty

    data = at_rest.load(workspace, index)
    if data is None:
        return {}
    _, blobs = _unpack(data)
    return ThresholdParty.secret_parts(blobs["party"]) if "party" in blobs else {}
