"""Update ciphers for mode "updates": the key setup as a pluggable layer under one FedAvg.

Privacy is a layer (like Flower's SecAgg+ strategy wrapper paired with a client mod): the FedAvg
strategy and the hospital app (:mod:`medfed.fl.updates`) are written once against two small
interfaces, and :data:`UPDATE_CIPHERS` maps each key setup to its pair:

* :class:`HospitalCipher` (inside a hospital): ``encrypt(vector) -> bytes``; the decrypt flow
  ``partials(...)`` (collective setups only) and ``decrypt(aggregate, record, length)``; and
  ``setup(step, record)`` for the key-setup messages.
* :class:`AggregatorCipher` (the aggregator): ``add(list[bytes]) -> bytes``, ``check`` of one
  contribution, ``setup`` (key-setup rounds), and ``decrypt_material``: what each hospital
  needs besides the aggregate to decrypt it (threshold: a round of sealed partial
  decryptions, with Shamir recovery of dropped hospitals' key shares).

Key setups:

* ``none``: plaintext float64 vectors, summed in the clear. Plain FedAvg, the baseline.
* ``shared``: one TenSEAL CKKS key provisioned to every hospital (as in mode "embeddings");
  the aggregator holds the public context only.
* ``threshold``: OpenFHE multiparty CKKS (:mod:`medfed.crypto.threshold`): a joint public
  key, key shares made by the hospitals, Shamir t-of-n recovery; partial decryptions travel
  sealed hospital-to-hospital. The hospitals' :class:`~medfed.crypto.threshold.ThresholdParty`
  objects refuse serialization, so they live in this process (:data:`_THRESHOLD_PARTIES`,
  keyed by workspace and hospital index): threshold runs use the in-process ``local`` backend.

A vector longer than one ciphertext's slots is split over several ciphertexts; a
contribution is one framed blob (:func:`frame`) either way. TenSEAL and OpenFHE are imported
only by the setups that need them (the threshold path runs where TenSEAL is absent).
"""

from __future__ import annotations

import json
import math
import secrets
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medfed.crypto.errors import CiphertextError, KeyMaterialError
from medfed.fl import messages as M

#: ``exchange(stage, {node: values}, message_type) -> {node: reply record}``: one protocol
#: round through the strategy (bytes and exclusions are recorded there).
Exchange = Callable[[str, dict[int, dict], str], dict[int, Mapping]]

_FRAME_MAGIC = b"MFUPD1"
#: Most ciphertexts one contribution may hold (a head of 32k values at 4096 slots is 8).
MAX_PARTS = 64


def frame(parts: Sequence[bytes]) -> bytes:
    """One blob from several ciphertexts: magic, count, then (length, bytes) per part."""
    out = bytearray(_FRAME_MAGIC + struct.pack(">I", len(parts)))
    for part in parts:
        out += struct.pack(">Q", len(part)) + bytes(part)
    return bytes(out)


def unframe(blob: bytes, *, sender: str = "sender", item: str = "update") -> list[bytes]:
    """Inverse of :func:`frame`; :class:`CiphertextError` naming the sender if malformed."""
    if not isinstance(blob, bytes | bytearray):
        raise CiphertextError(f"{item} from {sender}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    head = len(_FRAME_MAGIC) + 4
    if not blob.startswith(_FRAME_MAGIC) or len(blob) < head:
        raise CiphertextError(f"{item} from {sender} is not a medfed update blob (bad magic)")
    (count,) = struct.unpack(">I", blob[len(_FRAME_MAGIC) : head])
    if not 1 <= count <= MAX_PARTS:
        raise CiphertextError(f"{item} from {sender} holds {count} parts (1..{MAX_PARTS})")
    parts, off = [], head
    for _ in range(count):
        if off + 8 > len(blob):
            raise CiphertextError(f"{item} from {sender} is truncated")
        (size,) = struct.unpack(">Q", blob[off : off + 8])
        off += 8
        if off + size > len(blob):
            raise CiphertextError(f"{item} from {sender} is truncated")
        parts.append(blob[off : off + size])
        off += size
    if off != len(blob):
        raise CiphertextError(f"{item} from {sender} has trailing bytes")
    return parts


def chunk_sizes(length: int, slots: int) -> list[int]:
    """How a vector of ``length`` values is split over ciphertexts of ``slots`` slots."""
    n = max(1, math.ceil(length / slots))
    return [min(slots, length - k * slots) for k in range(n)]


def _chunks(vector: np.ndarray, slots: int) -> list[np.ndarray]:
    v = np.asarray(vector, dtype=np.float64).ravel()
    return [v[k : k + slots] for k in range(0, max(len(v), 1), slots)]


# ---------------------------------------------------------------------------- interfaces


class HospitalCipher(ABC):
    """A hospital's side of a key setup. Holds whatever secret the setup gives a hospital."""

    #: True when decryption needs the other hospitals (a partial-decryption round).
    collective = False

    def setup(self, step: str, record: Mapping) -> dict:
        """Answer one key-setup message (``messages.SETUP_STEP`` names the step)."""
        raise ValueError(f"this key setup has no setup step {step!r}")

    @abstractmethod
    def encrypt(self, vector: np.ndarray) -> bytes:
        """One contribution: the vector, encrypted (split over ciphertexts as needed)."""

    def partials(self, aggregate: bytes, recipients: Sequence[int], seal_round: int) -> dict:
        """Collective setups: this hospital's share of decrypting ``aggregate``, per peer."""
        raise ValueError("this key setup decrypts locally; there is no partial round")

    @abstractmethod
    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        """The aggregate's first ``length`` values (``record``: the rest of the request)."""


class AggregatorCipher(ABC):
    """The aggregator's side of a key setup: public material only, never a secret key."""

    name = "abstract"
    collective = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def setup(self, exchange: Exchange, nodes: list[int], names: dict[int, str]) -> list[int]:
        """Key-setup rounds; returns the nodes that completed them."""
        return list(nodes)

    @abstractmethod
    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        """Raise :class:`CiphertextError` unless ``blob`` is a usable contribution."""

    @abstractmethod
    def add(self, blobs: Sequence[bytes]) -> bytes:
        """The sum of checked contributions, as a blob of the same kind."""

    def decrypt_material(
        self, exchange: Exchange, aggregate: bytes, live: list[int], fl_round: int
    ) -> tuple[dict[int, dict], list[int]]:
        """What each live hospital needs, besides the aggregate, to decrypt it; and the nodes
        still live afterwards. Local decryption (none, shared) needs nothing."""
        return {n: {} for n in live}, list(live)

    def describe(self) -> dict:
        """Public parameters for the run's metrics."""
        return {"keys": self.name}


# ---------------------------------------------------------------------------- none


class PlainHospital(HospitalCipher):
    """keys "none": the update in the clear (float64). Plain FedAvg, for comparison only."""

    def encrypt(self, vector: np.ndarray) -> bytes:
        return frame([np.asarray(vector, dtype="<f8").ravel().tobytes()])

    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        (part,) = unframe(aggregate, sender="aggregator", item="aggregate")
        return np.frombuffer(part, dtype="<f8")[:length].astype(np.float64)


class PlainAggregator(AggregatorCipher):
    name = "none"

    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        parts = unframe(blob, sender=sender)
        if len(parts) != 1 or len(parts[0]) != 8 * length:
            raise CiphertextError(f"update from {sender} is not {length} float64 values")
        if not np.all(np.isfinite(np.frombuffer(parts[0], dtype="<f8"))):
            raise CiphertextError(f"update from {sender} has non-finite values")

    def add(self, blobs: Sequence[bytes]) -> bytes:
        total = sum(np.frombuffer(unframe(b)[0], dtype="<f8") for b in blobs)
        return frame([np.asarray(total, dtype="<f8").tobytes()])


# ---------------------------------------------------------------------------- shared


@lru_cache(maxsize=64)
def _secret_context(workspace: str, index: int):
    from medfed.crypto.context import load_secret_context
    from medfed.fl import workspace as W

    return load_secret_context(W.read_secret_context(Path(workspace), index))


def _slots(ctx) -> int:
    return ctx.data.seal_context().first_context_data().parms().poly_modulus_degree() // 2


class SharedKeyHospital(HospitalCipher):
    """keys "shared": TenSEAL CKKS under the consortium key every hospital was provisioned."""

    def __init__(self, workspace: str, index: int) -> None:
        self.ctx = _secret_context(workspace, index)
        self.slots = _slots(self.ctx)

    def setup(self, step: str, record: Mapping) -> dict:
        from medfed.crypto.context import context_fingerprint, public_context_bytes

        if step == "fingerprint":
            return {M.KEY_FINGERPRINT: context_fingerprint(self.ctx)}
        if step == "public_context":  # public + relinearization keys, never the secret key
            return {
                M.KEY_FINGERPRINT: context_fingerprint(self.ctx),
                M.PUBLIC_CONTEXT: public_context_bytes(self.ctx),
            }
        return super().setup(step, record)

    def encrypt(self, vector: np.ndarray) -> bytes:
        from medfed.crypto.context import encrypt

        return frame([encrypt(self.ctx, c).serialize() for c in _chunks(vector, self.slots)])

    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        from medfed.crypto.context import decrypt, load_ciphertext

        parts = unframe(aggregate, sender="aggregator", item="aggregate")
        sizes = chunk_sizes(length, self.slots)
        if len(parts) != len(sizes):
            raise CiphertextError(f"the aggregate has {len(parts)} ciphertexts, not {len(sizes)}")
        out = [
            decrypt(self.ctx, load_ciphertext(self.ctx, p, size=s, sender="aggregator", item="sum"))
            for p, s in zip(parts, sizes, strict=True)
        ]
        return np.concatenate(out)[:length]


class SharedKeyAggregator(AggregatorCipher):
    """Loads the lead hospital's public context (refusing a secret key) and adds CKKSVectors."""

    name = "shared"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.ctx = None
        self.fingerprint: str | None = None

    def setup(self, exchange: Exchange, nodes: list[int], names: dict[int, str]) -> list[int]:
        from medfed.crypto.context import context_fingerprint, load_public_context

        replies = exchange(
            "key-setup",
            {n: {M.SETUP_STEP: "fingerprint"} for n in nodes},
            M.MSG_KEY_SETUP,
        )
        for lead in sorted(replies):  # the first hospital that sends a usable public context
            extra = exchange(
                "public-context", {lead: {M.SETUP_STEP: "public_context"}}, M.MSG_KEY_SETUP
            )
            if lead in extra and M.PUBLIC_CONTEXT in extra[lead]:
                self.ctx = load_public_context(extra[lead][M.PUBLIC_CONTEXT], sender=names[lead])
                break
        if self.ctx is None:
            raise M.FederationError("no hospital sent the public context")
        self.fingerprint = context_fingerprint(self.ctx)
        self.slots = _slots(self.ctx)
        ok = [n for n in sorted(replies) if replies[n].get(M.KEY_FINGERPRINT) == self.fingerprint]
        self.rejected = {
            n: "encrypts under a different key set than the lead hospital's public key; "
            "re-provision this hospital with the consortium's key."
            for n in sorted(replies)
            if n not in ok
        }
        return ok

    def _load(self, blob: bytes, *, sender: str, length: int) -> list:
        from medfed.crypto.context import load_ciphertext

        parts = unframe(blob, sender=sender)
        sizes = chunk_sizes(length, self.slots)
        if len(parts) != len(sizes):
            raise CiphertextError(
                f"update from {sender} has {len(parts)} ciphertexts, expected {len(sizes)}"
            )
        return [
            load_ciphertext(self.ctx, p, size=s, sender=sender, item="update")
            for p, s in zip(parts, sizes, strict=True)
        ]

    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        self._load(blob, sender=sender, length=length)

    def add(self, blobs: Sequence[bytes]) -> bytes:
        import tenseal as ts

        total = None
        for blob in blobs:
            loaded = [ts.ckks_vector_from(self.ctx, v) for v in unframe(blob)]
            total = loaded if total is None else [a + b for a, b in zip(total, loaded, strict=True)]
        return frame([v.serialize() for v in total])

    def describe(self) -> dict:
        from medfed.crypto.params import get_preset

        return {"keys": "shared", "ckks": get_preset(self.settings.ckks).to_dict()}


# ---------------------------------------------------------------------------- threshold

#: Hospitals' threshold state in this process, by (workspace, hospital index). A
#: ThresholdParty holds a secret key share and refuses to be pickled or written to disk.
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

    def __init__(self, workspace: str, index: int) -> None:
        self.workspace, self.index = workspace, index
        self.party = None
        self._pending: tuple[bytes, list[bytes]] | None = None  # last aggregate, own partials

    def _need_party(self):
        if self.party is None:
            raise KeyMaterialError(
                f"hospital {self.index} has no threshold key share in this process: threshold "
                "keys run on the local backend only (key shares cannot leave the process)"
            )
        return self.party

    def setup(self, step: str, record: Mapping) -> dict:
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
            _hospital_policy(context.params)
            self.party = ThresholdParty(
                context, int(record[M.PARTY]), run_id=str(record[M.SESSION])
            )
            return {M.BUNDLE: self.party.public_bundle, M.PARTY: self.party.index}
        party = self._need_party()
        if step == "keygen":
            previous = record.get(M.PUBLIC_KEY)
            return {M.PUBLIC_KEY: party.keygen(bytes(previous) if previous else None)}
        if step == "share":
            party.set_peers({k + 1: bytes(b) for k, b in enumerate(record[M.PEERS])})
            party.set_joint_public_key(bytes(record[M.PUBLIC_KEY]))
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
        return super().setup(step, record)

    def encrypt(self, vector: np.ndarray) -> bytes:
        party = self._need_party()
        return frame([party.encrypt(c) for c in _chunks(vector, party.context.slots)])

    def partials(self, aggregate: bytes, recipients: Sequence[int], seal_round: int) -> dict:
        party = self._need_party()
        parts = unframe(aggregate, sender="aggregator", item="aggregate")
        own = [party.partial_decrypt(p) for p in parts]  # flooded; secret-bearing
        self._pending = (bytes(aggregate), own)
        envelope = frame(own)
        others = [int(r) for r in recipients if int(r) != party.index]
        return {
            M.RECIPIENTS: others,
            M.SEALED: [party.seal_to(r, envelope, round=seal_round) for r in others],
        }

    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
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
        return np.concatenate(out)[:length]


def _hospital_policy(params) -> None:
    """What a hospital insists on, whatever the aggregator asks: flooded partial decryptions."""
    if not params.noise_flooding:
        raise KeyMaterialError("refusing threshold parameters without noise flooding")


class ThresholdAggregatorCipher(AggregatorCipher):
    """Runs the key-setup chain and the partial-decryption rounds; adds with public keys only.

    Node ``k``-th in sorted node-id order becomes party ``k + 1`` (its position in the key
    chain and its Shamir x-coordinate). ``holders[s]`` is the party whose process holds key
    share ``s`` (``s`` itself, or the survivor that recovered it).
    """

    name = "threshold"
    collective = True

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        from medfed.crypto.threshold import (
            THRESHOLD_PRESETS,
            ThresholdParamsError,
            _require_openfhe,
        )

        _require_openfhe()
        n = settings.expected_hospitals
        preset = THRESHOLD_PRESETS[settings.threshold_preset]
        self.params = preset.with_parties(n, settings.threshold)
        # each round decrypts one aggregate (more when a partial round is redone); OpenFHE's
        # flooding noise is sized for max_decryptions under one joint key
        if settings.rounds + 2 > self.params.max_decryptions // 2:
            raise ThresholdParamsError(
                f"rounds={settings.rounds}: the threshold preset's flooding covers "
                f"{self.params.max_decryptions} decryptions per key; use fewer rounds"
            )
        self.agg = None
        self.party: dict[int, int] = {}  # node -> party index
        self.holders: dict[int, int] = {}
        self.seal_round = 0
        self.recoveries: list[dict] = []

    @property
    def t(self) -> int:
        return self.params.threshold

    def _node(self, party: int) -> int:
        return next(n for n, p in self.party.items() if p == party)

    def _all(self, exchange: Exchange, stage: str, payloads: dict[int, dict]) -> dict:
        replies = exchange(stage, payloads, M.MSG_KEY_SETUP)
        missing = sorted(set(payloads) - set(replies))
        if missing:
            raise M.FederationError(
                f"threshold key setup ({stage}) needs every hospital, but "
                f"{len(missing)} did not complete it; rerun when all {self.params.parties} "
                "hospitals are available"
            )
        return replies

    def setup(self, exchange: Exchange, nodes: list[int], names: dict[int, str]) -> list[int]:
        from medfed.crypto.threshold import ThresholdAggregator

        nodes = sorted(nodes)
        if len(nodes) != self.params.parties:
            raise M.FederationError(
                f"threshold keys for {self.params.parties} hospitals, but {len(nodes)} connected"
            )
        self.party = {n: k + 1 for k, n in enumerate(nodes)}
        self.holders = {p: p for p in self.party.values()}
        lead = nodes[0]
        params_json = json.dumps(self.params.to_dict())
        ctx = self._all(
            exchange,
            "key-context",
            {lead: {M.SETUP_STEP: "context", M.THRESHOLD_CONTEXT: params_json}},
        )[lead][M.THRESHOLD_CONTEXT]
        session = f"medfed-updates-{secrets.token_hex(8)}"  # bound into every sealed message
        joined = self._all(
            exchange,
            "key-join",
            {
                n: {
                    M.SETUP_STEP: "join",
                    M.THRESHOLD_CONTEXT: ctx,
                    M.PARTY: self.party[n],
                    M.SESSION: session,
                }
                for n in nodes
            },
        )
        bundles = [bytes(joined[n][M.BUNDLE]) for n in nodes]
        running = None
        for n in nodes:  # the key chain: party k extends party k-1's public key
            payload = {M.SETUP_STEP: "keygen"}
            if running is not None:
                payload[M.PUBLIC_KEY] = running
            running = self._all(exchange, f"key-chain-{self.party[n]}", {n: payload})[n][
                M.PUBLIC_KEY
            ]
        shared = self._all(
            exchange,
            "key-share",
            {n: {M.SETUP_STEP: "share", M.PEERS: bundles, M.PUBLIC_KEY: running} for n in nodes},
        )
        inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in nodes}
        for n in nodes:  # relay each sealed Shamir share to its recipient, unopened
            for r, blob in zip(shared[n][M.RECIPIENTS], shared[n][M.SEALED], strict=True):
                senders, blobs = inbox[self._node(int(r))]
                senders.append(self.party[n])
                blobs.append(blob)
        self._all(
            exchange,
            "key-accept",
            {
                n: {M.SETUP_STEP: "accept", M.SENDERS: inbox[n][0], M.SEALED: inbox[n][1]}
                for n in nodes
            },
        )
        self.agg = ThresholdAggregator(ctx, running)
        return nodes

    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        from medfed.crypto.threshold import ThresholdError

        parts = unframe(blob, sender=sender)
        sizes = chunk_sizes(length, self.agg.context.slots)
        if len(parts) != len(sizes):
            raise CiphertextError(f"update from {sender}: {len(parts)} ciphertexts, not {sizes}")
        try:
            for p in parts:
                self.agg.add([p])  # parses, checks the context and the joint key tag
        except ThresholdError as e:
            raise CiphertextError(f"update from {sender}: {e}") from None

    def add(self, blobs: Sequence[bytes]) -> bytes:
        split = [unframe(b) for b in blobs]
        return frame([self.agg.add([s[k] for s in split]) for k in range(len(split[0]))])

    # -- decryption: partial round, with Shamir recovery of missing key shares --------------
    def _recover(self, exchange: Exchange, live: list[int], fl_round: int) -> list[int]:
        """Make a live hospital hold every key share whose holder is gone."""
        while True:
            alive = {self.party[n] for n in live}
            missing = sorted(s for s, h in self.holders.items() if h not in alive)
            if not missing:
                return live
            if len(alive) < self.t:
                raise M.FederationError(
                    f"only {len(alive)} hospitals remain; the {self.t}-of-{self.params.parties} "
                    f"threshold setup cannot recover key shares {missing}, so nobody can decrypt"
                )
            share = missing[0]
            recoverer, *helpers = sorted(alive)
            helpers = helpers[: self.t - 1]
            self.seal_round += 1
            got = exchange(
                f"recover-share-{share}",
                {
                    self._node(h): {
                        M.SETUP_STEP: "recovery_share",
                        M.DROPPED: share,
                        M.RECOVERER: recoverer,
                        M.STEP: self.seal_round,
                        M.FL_ROUND: fl_round,
                    }
                    for h in helpers
                },
                M.MSG_KEY_SETUP,
            )
            gone = [self._node(h) for h in helpers if self._node(h) not in got]
            if gone:  # a helper is gone too: drop it and try again
                live = [n for n in live if n not in gone]
                continue
            node = self._node(recoverer)
            done = exchange(
                f"recover-{share}",
                {
                    node: {
                        M.SETUP_STEP: "recover",
                        M.DROPPED: share,
                        M.SENDERS: helpers,
                        M.SEALED: [got[self._node(h)][M.SEALED][0] for h in helpers],
                        M.STEP: self.seal_round,
                        M.FL_ROUND: fl_round,
                    }
                },
                M.MSG_KEY_SETUP,
            )
            if node not in done:
                live = [n for n in live if n != node]
                continue
            self.holders[share] = recoverer
            self.recoveries.append({"share": share, "recovered_by": recoverer, "round": fl_round})

    def decrypt_material(
        self, exchange: Exchange, aggregate: bytes, live: list[int], fl_round: int
    ) -> tuple[dict[int, dict], list[int]]:
        while True:
            live = self._recover(exchange, list(live), fl_round)
            self.seal_round += 1
            recipients = sorted(self.party[n] for n in live)
            replies = exchange(
                f"partial-{fl_round}",
                {
                    n: {
                        M.AGGREGATE: aggregate,
                        M.RECIPIENTS: recipients,
                        M.STEP: self.seal_round,
                        M.FL_ROUND: fl_round,
                    }
                    for n in live
                },
                M.MSG_PARTIAL,
            )
            if set(replies) == set(live):
                break
            live = [n for n in live if n in replies]  # recover the leavers' shares, redo
        material: dict[int, dict] = {
            n: {M.SENDERS: [], M.SEALED: [], M.STEP: self.seal_round} for n in live
        }
        for n in live:  # relay every sealed partial decryption to its recipient, unopened
            for r, blob in zip(replies[n][M.RECIPIENTS], replies[n][M.SEALED], strict=True):
                target = material[self._node(int(r))]
                target[M.SENDERS].append(self.party[n])
                target[M.SEALED].append(blob)
        return material, live

    def describe(self) -> dict:
        return {
            "keys": "threshold",
            "t": self.t,
            "n": self.params.parties,
            "params": self.params.to_dict(),
            "recoveries": self.recoveries,
        }


# ---------------------------------------------------------------------------- registry

#: key setup -> (hospital side, aggregator side)
UPDATE_CIPHERS: dict[str, tuple[type[HospitalCipher], type[AggregatorCipher]]] = {
    "none": (PlainHospital, PlainAggregator),
    "shared": (SharedKeyHospital, SharedKeyAggregator),
    "threshold": (ThresholdHospital, ThresholdAggregatorCipher),
}


def _known(keys: str) -> tuple[type[HospitalCipher], type[AggregatorCipher]]:
    try:
        return UPDATE_CIPHERS[keys]
    except KeyError:
        raise ValueError(
            f"unknown key setup {keys!r}; valid: {', '.join(sorted(UPDATE_CIPHERS))}"
        ) from None


def hospital_cipher(keys: str, workspace: str | Path, index: int) -> HospitalCipher:
    """This hospital's cipher (threshold: the same object across rounds, in this process)."""
    cls = _known(keys)[0]
    if cls is ThresholdHospital:
        with _LOCK:
            key = (str(workspace), int(index))
            if key not in _THRESHOLD_PARTIES:
                _THRESHOLD_PARTIES[key] = ThresholdHospital(str(workspace), int(index))
            return _THRESHOLD_PARTIES[key]
    if cls is PlainHospital:
        return PlainHospital()
    return cls(str(workspace), int(index))


def aggregator_cipher(keys: str, settings: Any) -> AggregatorCipher:
    return _known(keys)[1](settings)
