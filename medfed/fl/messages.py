"""Protocol constants: message types, record keys and error replies (named once, used
everywhere).

Payload values are ciphertext bytes, JSON layouts, small integers and names. Nothing else
ever travels from a hospital to the aggregator; ``tests/test_threat_model.py`` checks it.

A reply that carries no record carries one of Flower's error codes, named here once
(:data:`NODE_UNAVAILABLE`, :data:`APP_RAISED`, :data:`APP_CRASHED`) and built with
:func:`error_reply`: by the hospitals' failure guard (:func:`medfed.fl.workspace.guarded`),
the fault mod (:mod:`medfed.fl.faults`) and the in-process grid (:mod:`medfed.fl.local_grid`).

Every record is signed (:data:`SIGNATURE`, Ed25519 under keys pinned at provisioning,
:mod:`medfed.crypto.signing`): requests by the aggregator (:func:`sign_request`, checked by
the hospital with :func:`verify_request`), replies by the hospital (:func:`sign_reply`,
checked by the aggregator with :func:`verify_reply`). Error replies carry no record and no
signature.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from medfed.crypto.signing import AGGREGATOR, PinnedKeys, SignatureError, SigningKey, statement
from medfed.errors import MedfedError

# Message types ("<category>.<action>", routed by Flower's ClientApp)
MSG_STATS = "query.stats"  # hospitals -> encrypted feature sums (for the shared normalization)
MSG_UPLOAD = "train.upload"  # hospitals -> encrypted feature/label blocks
MSG_SUM = "query.sum"  # aggregator -> masked products; a hospital -> encrypted sums
MSG_PUBLIC_CONTEXT = "query.publiccontext"  # fallback when the lead hospital is gone
MSG_FINAL = "evaluate.final"  # aggregator -> the encrypted head; hospitals decrypt, evaluate

# Mode "updates" (medfed/fl/updates.py)
MSG_KEY_SETUP = "query.keysetup"  # key-setup steps of the update cipher (SETUP_STEP names one)
MSG_UPDATE_STATS = "query.updatestats"  # hospitals -> encrypted stats (shared normalization)
MSG_PARTIAL = "query.partial"  # threshold: aggregate in, partial decryptions sealed per peer out
MSG_LOCAL_TRAIN = "train.local"  # aggregate in; decrypt, train locally, encrypted update out
MSG_UPDATE_FINAL = "evaluate.updatefinal"  # final aggregate in; decrypt, evaluate, ack out

# Mode "embeddings" with threshold keys (medfed/fl/threshold_embeddings.py)
MSG_THRESHOLD_STATS = "query.thresholdstats"  # hospitals -> Enc_joint(stats), bucket count
MSG_THRESHOLD_UPLOAD = "train.thresholdupload"  # stats partials in; blocks under the joint key
MSG_REFRESH_ELEMENT = "query.refreshelement"  # the refresh's lead: fresh elements, digests sealed
MSG_REFRESH = "query.refresh"  # c1s and elements in; every held key share's refresh shares out
MSG_THRESHOLD_FINAL = "evaluate.thresholdfinal"  # head partials in; fuse, evaluate, ack out

RECORD = "medfed"  # the one ConfigRecord in every message

# Keys inside the record
HOSPITAL = "hospital"
BUCKETS = "buckets"
STATS = "stats"
PUBLIC_CONTEXT = "public_context"
GALOIS_KEYS = "galois_keys"
MASKS = "masks"
KEY_FINGERPRINT = "key_fingerprint"
STATS_TOTAL = "stats_total"
LAYOUT = "layout"
POSITION = "position"  # the hospital's allocation index in the layout
BLOCKS = "blocks"
FEATURES = "x"
LABELS = "y"
MASKED = "masked"
SUMS = "sums"
STEP = "step"
WEIGHTS = "weights"
OK = "ok"
# mode "updates"
FL_ROUND = "fl_round"  # FedAvg round of a request
SETUP_STEP = "setup_step"
UPDATE = "update"  # Enc([n_i * w_i, n_i]) (or Enc(stats)): one framed ciphertext blob
AGGREGATE = "aggregate"  # the encrypted sum, relayed back to the hospitals
LOCAL_EPOCHS = "local_epochs"
LR = "lr"
L2 = "l2"  # aggregator -> hospitals in mode "updates": L2 penalty of local training
PARTY = "party"  # threshold: the hospital's key-share index 1..n
BUNDLE = "bundle"  # threshold: a hospital's public channel keys
PEERS = "peers"  # threshold: every hospital's bundle, by party index 1..n
THRESHOLD_CONTEXT = "threshold_context"  # threshold: public OpenFHE context (no key)
PUBLIC_KEY = "public_key"  # threshold: the running / joint public key
SEALED = "sealed"  # threshold: messages sealed hospital-to-hospital, opaque to the aggregator
SENDERS = "senders"  # threshold: party index of each SEALED item's sender
RECIPIENTS = "recipients"  # threshold: party index of each SEALED item's recipient
DROPPED = "dropped"  # threshold: key share to recover
RECOVERER = "recoverer"  # threshold: the party that recovers it
SESSION = "session"  # threshold: run id bound into every sealed hospital-to-hospital message
ENDORSEMENT = "endorsement"  # threshold: a hospital's signature over an item it made for peers
ENDORSEMENTS = "endorsements"  # threshold: the endorsement of each PEERS bundle, by party index
SIGNER = "signer"  # threshold: the hospital whose ENDORSEMENT a request relays
SIGNERS = "signers"  # threshold: the hospital name of each party index 1..n
STEPS = "steps"  # threshold: rotation steps the joint rotation keys are made for
SHARE = "share"  # threshold: a party's share of the joint evaluation keys (round A)
LEAD_SHARE = "lead_share"  # threshold: party 1's round-A share, whose public parts others use
SWITCH_KEY = "switch_key"  # threshold: the joint key-switching key (round A's result)
KEY_SHARES = "key_shares"  # threshold: the key shares a party answers for (own, recovered)
SHARES = "shares"  # threshold: one item per key share / per refreshed ciphertext
ELEMENTS = "elements"  # threshold: the refresh's common random elements, made by its lead
C1 = "c1"  # threshold: the second element of each ciphertext to refresh
LEAD = "lead"  # threshold: the party index that made this refresh's elements
SLICE = "slice"  # threshold: which slice of a hospital's upload ciphertexts a message carries
COUNT = "count"  # threshold: elements the refresh's lead makes; a hospital's upload ciphertexts

# Envelope keys (every stage, every mode): the aggregator names the stage and sends a fresh
# round id with each message; the hospital echoes the round id and adds a digest of its reply.
N_FEATURES = "n_features"  # hospital -> aggregator at stats: embedding dimension (public)
STAGE = "stage"  # aggregator -> hospital: "stats", "upload", "sum-<epoch>", "final", ...
ROUND_ID = "round_id"  # aggregator -> hospital: a nonce for this message; echoed in the reply
DIGEST = "digest"  # hospital -> aggregator: SHA-256 over the reply's values (round id included)
SIGNATURE = "signature"  # both ways: Ed25519 over run id, type, stage, round id, parties, digest
_UNDIGESTED = (DIGEST, SIGNATURE)  # the digest covers every other value of a record

#: Node config key of a hospital's index (Flower's simulation engine and LocalGrid set it).
PARTITION_ID = "partition-id"

# Error replies: Flower's own codes, one name per case medfed produces
#: The hospital answers nothing (a dropout, or a crashed hospital asked again): no reply.
NODE_UNAVAILABLE = ErrorCode.NODE_UNAVAILABLE
#: The hospital's handler raised; the reason names the hospital and the stage only.
APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
#: The hospital died mid-round, after doing the round's work (an injected crash).
APP_CRASHED = ErrorCode.CLIENT_APP_CRASHED
#: Flower error codes that mean "this node did not answer": handled exactly like a timeout.
NO_REPLY_CODES = (
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    NODE_UNAVAILABLE,
)


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """The reply to ``msg`` that carries Flower error ``code`` (one of the names above) and
    ``reason`` instead of a record."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def node_index(context: Context) -> int:
    """The index of the hospital a node serves (its ``partition-id``, 0-based)."""
    return int(context.node_config[PARTITION_ID])


def make_content(**values) -> RecordDict:
    """A message's content: ``values`` in the one :data:`RECORD`."""
    return RecordDict({RECORD: ConfigRecord(values)})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of ciphertexts, strings and scalars in a message (what a wire would carry)."""
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, bytes | str):
                    total += len(item)
                else:
                    total += 8
    return total


def inventory(content: RecordDict) -> dict[str, Any]:
    """What a message carries, for the per-party audit: ``binary`` items (ciphertexts, keys,
    sealed or signed bytes), ``plain`` values (strings, numbers), ``bytes`` (as
    :func:`payload_bytes`) and each field's kind (``binary``, ``plain`` or ``empty``)."""
    binary = plain = 0
    fields: dict[str, str] = {}
    for record in content.config_records.values():
        for key, value in record.items():
            items = value if isinstance(value, list) else [value]
            n_binary = sum(isinstance(item, bytes) for item in items)
            binary += n_binary
            plain += len(items) - n_binary
            if not items:
                fields[key] = "empty"
            else:
                fields[key] = "binary" if n_binary == len(items) else "plain"
    return {"binary": binary, "plain": plain, "bytes": payload_bytes(content), "fields": fields}


def describe(content: RecordDict) -> str:
    """Log-safe summary: key names and sizes, never key or ciphertext bytes."""
    parts = []
    for record in content.config_records.values():
        for key, value in record.items():
            if isinstance(value, bytes):
                parts.append(f"{key}=<{len(value)} bytes>")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                parts.append(f"{key}=<{len(value)} ciphertexts>")
            else:
                parts.append(f"{key}={value!r}"[:80])
    return ", ".join(parts)


class ProtocolError(MedfedError, ValueError):
    """A reply that breaks the protocol envelope: corrupt, replayed or impersonating."""


class FederationError(MedfedError, RuntimeError):
    """The federation cannot continue (e.g. too few hospitals answered).

    A run that started but could not finish: the CLI prints the message and exits with
    status 1, not 2 (the status of the other :class:`~medfed.errors.MedfedError` s).
    """


def reply_digest(values: Mapping) -> str:
    """SHA-256 over a record's keys and values (``DIGEST`` and ``SIGNATURE`` excluded), in key
    order.

    Unkeyed, it detects replies corrupted after the hospital built them; the signature
    (:func:`sign_reply`, :func:`sign_request`) covers it, which is what authenticates the
    payload, the echoed round id and the hospital name.
    """
    h = hashlib.sha256()
    for key in sorted(k for k in values if k not in _UNDIGESTED):
        value = values[key]
        items = value if isinstance(value, list) else [value]
        h.update(f"{key}:{len(items)}:".encode())
        for item in items:
            tag, raw = _canonical(item)
            h.update(f"{tag}:{len(raw)}:".encode())
            h.update(raw)
    return h.hexdigest()


def _canonical(item) -> tuple[str, bytes]:
    """Type tag and bytes of one value, the same before and after Flower's (de)serialization."""
    if isinstance(item, bytes | bytearray):
        return "b", bytes(item)
    if isinstance(item, bool):
        return "t", str(item).encode()
    if isinstance(item, numbers.Integral):
        return "i", str(int(item)).encode()
    if isinstance(item, numbers.Real):
        return "f", repr(float(item)).encode()
    return "s", str(item).encode()


def make_reply(msg: Message, **values) -> Message:
    """A hospital's reply: echoes the request's round id and adds the digest of its values."""
    record = msg.content.config_records.get(RECORD)
    if record is not None and ROUND_ID in record:
        values[ROUND_ID] = record[ROUND_ID]
    values[DIGEST] = reply_digest(values)
    return Message(make_content(**values), reply_to=msg)


def check_reply(record: Mapping, *, round_id: str, hospital: str | None, party: str) -> None:
    """The aggregator's envelope check of one reply; raises :class:`ProtocolError`.

    ``round_id`` is what was sent to this node in this round; ``hospital`` the name this node
    announced at ``stats`` (None before that); ``party`` names the node in the message.
    """
    if record.get(DIGEST) != reply_digest(record):
        raise ProtocolError(
            f"the reply from {party} fails its integrity check (SHA-256 digest mismatch): "
            "corrupted after the hospital built it; dropped (the hospital must resend; check "
            "its storage and network)."
        )
    echoed = record.get(ROUND_ID)
    if echoed != round_id:
        raise ProtocolError(
            f"the reply from {party} echoes round id {str(echoed)[:40]!r}, not the one this "
            "round sent it: a replayed or misrouted message; rejected (the hospital must "
            "answer the current request)."
        )
    claimed = record.get(HOSPITAL)
    if hospital is not None and claimed is not None and str(claimed) != hospital:
        raise ProtocolError(
            f"the reply from {party} claims to come from {str(claimed)[:40]!r}: another "
            "hospital's identity; rejected (each node must answer under the name it announced "
            "at stats)."
        )


# ------------------------------------------------------------------------------ signatures


def node_party(node_id: int) -> str:
    """How a signed request names its recipient: the Flower node it is addressed to."""
    return f"node-{int(node_id)}"


def _statement(
    kind: str, record: Mapping, key_run: str, message_type: str, stage: str, sender: str, to: str
) -> bytes:
    return statement(
        kind,
        run_id=key_run,
        message_type=message_type,
        stage=stage,
        round_id=str(record.get(ROUND_ID, "")),
        sender=sender,
        recipient=to,
        digest=reply_digest(record),
    )


def sign_request(key: SigningKey, values: Mapping, message_type: str, node: int) -> bytes:
    """The aggregator's signature of a request's ``values`` (stage and round id included) to
    ``node``: over the run id, ``message_type``, stage, round id, both parties and the digest."""
    stage = str(values[STAGE])
    run = key.pinned.run_id
    return key.sign(
        _statement("request", values, run, message_type, stage, AGGREGATOR, node_party(node))
    )


def verify_request(msg: Message, pinned: PinnedKeys, node_id: int) -> None:
    """The hospital's check that ``msg`` is the aggregator's, for this run and this node;
    :class:`~medfed.crypto.signing.SignatureError` (or :class:`ProtocolError`) if not."""
    record = msg.content.config_records.get(RECORD)
    if record is None:
        raise ProtocolError("the request carries no medfed record; rejected")
    message = _statement(
        "request",
        record,
        pinned.run_id,
        msg.metadata.message_type,
        str(record.get(STAGE, "")),
        AGGREGATOR,
        node_party(node_id),
    )
    pinned.verify(AGGREGATOR, record.get(SIGNATURE), message)


def sign_reply(msg: Message, reply: Message, key: SigningKey) -> Message:
    """``reply`` (to request ``msg``) with the hospital's :data:`SIGNATURE` added: over the run
    id, the request's type and stage, the echoed round id, both parties and the digest."""
    values = dict(reply.content[RECORD])
    values.pop(SIGNATURE, None)
    stage = str(msg.content[RECORD].get(STAGE, ""))
    run = key.pinned.run_id
    values[SIGNATURE] = key.sign(
        _statement("reply", values, run, msg.metadata.message_type, stage, key.name, AGGREGATOR)
    )
    return Message(make_content(**values), reply_to=msg)


def verify_reply(
    record: Mapping, pinned: PinnedKeys, *, message_type: str, stage: str, sender: str | None
) -> None:
    """The aggregator's check that ``sender`` (the node's known name, else the name the reply
    claims) signed this reply for this run, message and stage; raises :class:`ProtocolError`."""
    if sender is None:
        raise ProtocolError("the reply names no hospital, so no key can check it; rejected")
    message = _statement("reply", record, pinned.run_id, message_type, stage, sender, AGGREGATOR)
    try:
        pinned.verify(sender, record.get(SIGNATURE), message)
    except SignatureError as e:
        raise ProtocolError(f"{e} (reply in the name of {sender[:40]!r})") from None
