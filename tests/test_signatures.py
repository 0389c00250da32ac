"""Signed messages in both directions (issue 20: "Nothing is authenticated").

Every party has an Ed25519 key pinned at provisioning. The aggregator signs each request and
every hospital checks it before anything else runs (``workspace.authenticate``); every
hospital signs each reply and the aggregator checks it in ``RoundExchange`` (an exclusion, not
a crash). Threshold bundles: ``test_check_peers_*`` here, whole federations in
tests/threshold/test_signed_setup.py.

Each attack also runs as a control with the check disabled (the verify function
monkeypatched to accept anything): the control shows the attack succeeds against the unkeyed
SHA-256 digest alone, so each test would fail without the signatures.
"""

import os
import stat

import pytest
from flwr.app import Message

from medfed.crypto.signing import (
    SIGNATURE_BYTES,
    PinnedKeys,
    SignatureError,
    SigningKey,
    provision_keys,
    statement,
)
from medfed.fl import messages as M
from medfed.fl.ciphers.threshold.endorse import BUNDLE, check_peers, endorse
from medfed.fl.hospital import make_hospital_app
from medfed.fl.local_grid import LocalGrid
from medfed.fl.updates import make_updates_hospital_app
from medfed.fl.workspace import SIGNING_KEY, hospital_dir, load_signing_key
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import AGGREGATOR_KEYS, excluded, federation, provision_all, provision_signed

# ------------------------------------------------------------------------------- the keys


def test_statements_are_unambiguous_and_cover_every_field():
    base = dict(run_id="r", message_type="t", stage="s", round_id="s/1", sender="a", recipient="b")
    one = statement("reply", **base, digest="d")
    assert statement("reply", **{**base, "sender": "ab", "recipient": ""}, digest="d") != one
    for field in base:
        assert statement("reply", **{**base, field: base[field] + "x"}, digest="d") != one
    assert statement("request", **base, digest="d") != one


def test_provisioning_pins_every_public_key_and_writes_private_keys_0600(tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=60, d=4)
    aggregator = provision_all(tmp_path, hospitals)
    for i, h in enumerate(hospitals):
        path = hospital_dir(tmp_path, i) / SIGNING_KEY
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        key = load_signing_key(tmp_path, i)
        assert key.name == h.name and key.pinned == aggregator.pinned
        assert key.pinned.key_of(h.name) == key.public
        for f in hospital_dir(tmp_path, i).iterdir():  # the aggregator's key is nowhere here
            assert aggregator.private not in f.read_bytes()
    assert PinnedKeys.from_dict(aggregator.pinned.to_dict()) == aggregator.pinned
    assert "private" not in repr(aggregator) and aggregator.private.hex() not in repr(aggregator)
    with pytest.raises(SignatureError, match="unique"):
        provision_keys(["a", "a"])


def test_no_private_key_ever_travels(tmp_path):
    _, strategy, grid, _ = federation(tmp_path, n=3)
    secrets = [load_signing_key(tmp_path, i).private for i in range(3)]
    secrets.append(strategy.s.signing.private)
    for msg in [*grid.sent, *grid.received]:
        for value in msg.content[M.RECORD].values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    assert not any(s in item for s in secrets)
    signatures = [m.content[M.RECORD][M.SIGNATURE] for m in [*grid.sent, *grid.received]]
    assert all(len(s) == SIGNATURE_BYTES for s in signatures)


def test_a_signature_adds_64_bytes_per_message():
    values = {M.HOSPITAL: "hospital-0", M.OK: 1, M.ROUND_ID: "final/0123456789abcdef"}
    plain = M.payload_bytes(M.make_content(**values))
    signed = M.payload_bytes(M.make_content(**values, **{M.SIGNATURE: b"\x00" * 64}))
    assert signed - plain == SIGNATURE_BYTES


# ------------------------------------------------------------------------- forged replies


def _answer(grid, msg, reply):
    grid.sent.append(msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    grid.received.append(reply)
    return reply


def _tampering_grid(tamper):
    """A LocalGrid where ``tamper(grid, msg)`` may answer a message in place of the node."""

    class Tampering(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id
                reply = tamper(self, msg)
                if reply is None:
                    out.extend(super().send_and_receive([msg], timeout=timeout))
                else:
                    out.append(_answer(self, msg, reply))
            return out

    return Tampering


def _accept_any_reply(monkeypatch):
    monkeypatch.setattr(M, "verify_reply", lambda *a, **k: None)


def _forged_final(tmp_path):
    """hospital-0's final ack, forged: valid digest and round id, hospital-0's name, signed
    with hospital-1's key. hospital-0 itself is never asked (it never evaluates)."""

    def tamper(grid, msg):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type != M.MSG_FINAL or M.node_index(grid.contexts[node]) != 0:
            return None
        stolen = load_signing_key(tmp_path, 1)
        forger = SigningKey("hospital-0", stolen.private, stolen.pinned)
        reply = M.make_reply(msg, **{M.HOSPITAL: "hospital-0", M.OK: 1})
        return M.sign_reply(msg, reply, forger)

    return _tampering_grid(tamper)


def test_a_forged_reply_in_another_hospitals_name_is_excluded(tmp_path):
    _, _, _, result = federation(tmp_path, n=3, grid_cls=_forged_final(tmp_path))
    (bad,) = excluded(result, "final")
    assert bad["hospital"] == "hospital-0"
    assert "does not verify under its pinned public key" in bad["reason"]
    assert "hospital-0" not in result["evaluated_by"]


def test_control_without_the_check_the_forged_reply_is_accepted(tmp_path, monkeypatch):
    _accept_any_reply(monkeypatch)
    _, _, _, result = federation(tmp_path, n=3, grid_cls=_forged_final(tmp_path))
    assert excluded(result, "final") == []
    assert "hospital-0" in result["evaluated_by"]  # though it never evaluated anything
    assert not (hospital_dir(tmp_path, 0) / "eval.json").exists()


def _replaying(kind):
    """Answers the second masked-sum request a node gets with its first reply, its round id
    rewritten and its digest recomputed (all the unkeyed envelope asks for); ``kind``
    "run": instead, the first one gets a reply the hospital signed with its own key in another
    run. Once per federation."""
    first, done = {}, []

    def tamper(grid, msg):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type != M.MSG_SUM or done:
            return None
        if kind == "run":
            done.append(node)
            reply = grid.client_app(msg, grid.contexts[node])
            key = load_signing_key(grid.workspace, M.node_index(grid.contexts[node]))
            other = PinnedKeys("run-another", key.pinned.aggregator, key.pinned.hospitals)
            return M.sign_reply(msg, reply, SigningKey(key.name, key.private, other))
        if node not in first:
            first[node] = reply = grid.client_app(msg, grid.contexts[node])
            return reply
        done.append(node)
        values = dict(first[node].content[M.RECORD])
        values[M.ROUND_ID] = msg.content[M.RECORD][M.ROUND_ID]
        values[M.DIGEST] = M.reply_digest(values)
        return Message(M.make_content(**values), reply_to=msg)

    return _tampering_grid(tamper)


@pytest.mark.parametrize("kind", ["round", "run"])
def test_a_reply_replayed_from_another_round_or_run_is_excluded(tmp_path, kind):
    grid_cls = _replaying(kind)
    grid_cls.workspace = tmp_path
    _, _, _, result = federation(tmp_path, n=3, epochs=4, grid_cls=grid_cls)
    bad = [e for e in result["excluded"] if e["stage"].startswith("sum-")]
    assert bad and all("does not verify" in e["reason"] for e in bad)
    assert len(result["refreshes"]) == 4  # retried with another hospital; training completed


@pytest.mark.parametrize("kind", ["round", "run"])
def test_control_without_the_check_the_replayed_reply_is_accepted(tmp_path, monkeypatch, kind):
    _accept_any_reply(monkeypatch)
    grid_cls = _replaying(kind)
    grid_cls.workspace = tmp_path
    _, _, _, result = federation(tmp_path, n=3, epochs=4, grid_cls=grid_cls)
    assert [e for e in result["excluded"] if e["stage"].startswith("sum-")] == []


# -------------------------------------------------------------------------------- requests

EMBEDDINGS_TYPES = (M.MSG_STATS, M.MSG_PUBLIC_CONTEXT, M.MSG_UPLOAD, M.MSG_SUM, M.MSG_FINAL)
UPDATES_TYPES = (
    M.MSG_KEY_SETUP,
    M.MSG_UPDATE_STATS,
    M.MSG_PARTIAL,
    M.MSG_LOCAL_TRAIN,
    M.MSG_UPDATE_FINAL,
)


def _hospital(tmp_path, factory):
    """One provisioned hospital behind ``factory``'s app, with a spy mod (inside the
    authentication) that records every request reaching the hospital's own code."""
    hospitals = synthetic_hospitals(n_hospitals=2, n=80, d=4)
    meta = {"keys": "none", "bucket": 32, "n_classes": 2, "ckks": "fast", "feature_scale": 1.0}
    if factory is make_hospital_app:
        aggregator = provision_all(tmp_path, hospitals)
    else:
        aggregator = provision_signed(tmp_path, hospitals, None, meta)
    seen = []

    def spy(msg, context, call_next):
        seen.append(msg.metadata.message_type)
        return call_next(msg, context)

    return LocalGrid(factory(tmp_path, mods=[spy]), 2), aggregator, seen


def _request(grid, message_type, signer=None, *, sign_for=None, round_id="stats/1"):
    node = max(grid.contexts)  # partition 0
    values = {M.STAGE: "stats", M.ROUND_ID: round_id}
    if signer is not None:
        to = node if sign_for is None else sign_for
        values[M.SIGNATURE] = M.sign_request(signer, values, message_type, to)
    return Message(M.make_content(**values), dst_node_id=node, message_type=message_type)


def _refused(reply) -> bool:
    return reply.has_error() and "fails the aggregator's signature check" in reply.error.reason


@pytest.mark.parametrize(
    "factory, types",
    [(make_hospital_app, EMBEDDINGS_TYPES), (make_updates_hospital_app, UPDATES_TYPES)],
)
def test_a_request_not_from_the_aggregator_is_refused_before_any_handler(tmp_path, factory, types):
    grid, aggregator, seen = _hospital(tmp_path, factory)
    hospital = load_signing_key(tmp_path, 1)
    as_aggregator = SigningKey("aggregator", hospital.private, hospital.pinned)
    other_run = PinnedKeys("run-another", aggregator.pinned.aggregator, {})
    forged = {
        "unsigned": lambda t: _request(grid, t),
        "signed by a hospital": lambda t: _request(grid, t, as_aggregator),
        "signed for another node": lambda t: _request(
            grid, t, aggregator, sign_for=min(grid.contexts)
        ),
        "signed in another run": lambda t: _request(
            grid, t, SigningKey("aggregator", aggregator.private, other_run)
        ),
    }
    for kind, make in forged.items():
        for message_type in types:
            (reply,) = grid.send_and_receive([make(message_type)])
            assert _refused(reply), (kind, message_type)
    assert seen == []  # no handler (and no other mod) ever saw them
    errors = (hospital_dir(tmp_path, 0) / "errors.log").read_text()
    assert "refused a request" in errors and "does not verify" in errors
    # the aggregator's own request gets through, once: the same round id again is a replay
    (reply,) = grid.send_and_receive([_request(grid, types[-1], aggregator)])
    assert not _refused(reply) and seen == [types[-1]]
    (reply,) = grid.send_and_receive([_request(grid, types[-1], aggregator)])
    assert (
        _refused(reply)
        and "answered before" in (hospital_dir(tmp_path, 0) / "errors.log").read_text()
    )


def test_control_without_the_check_an_unsigned_request_reaches_the_handler(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "verify_request", lambda *a, **k: None)
    grid, _, seen = _hospital(tmp_path, make_hospital_app)
    (reply,) = grid.send_and_receive([_request(grid, M.MSG_STATS)])
    assert not reply.has_error() and M.STATS in reply.content[M.RECORD]  # it answered
    assert seen == [M.MSG_STATS]


def test_an_aggregator_without_a_signing_key_stops_at_once(tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    provision_all(tmp_path, hospitals)
    AGGREGATOR_KEYS[str(tmp_path)] = None
    from tests.fl_helpers import run_local

    with pytest.raises(M.FederationError, match="no signing key"):
        run_local(tmp_path, 3)


# ---------------------------------------------------------------------- threshold bundles


def _bundles(n=3):
    ring = provision_keys([f"hospital-{i}" for i in range(n)])
    bundles = [os.urandom(69) for _ in range(n)]
    ends = [endorse(ring.hospitals[k], BUNDLE, "s1", k + 1, b) for k, b in enumerate(bundles)]
    return ring, bundles, ends, [h.name for h in ring.hospitals]


def test_check_peers_accepts_endorsed_bundles_and_refuses_a_swapped_one():
    ring, bundles, ends, names = _bundles()
    me = ring.hospitals[0]
    kwargs = dict(own=me.name, party=1, session="s1", endorsements=ends, signers=names)
    assert check_peers(me.pinned, bundles=bundles, **kwargs) == dict(enumerate(bundles, 1))
    swapped = [bundles[0], os.urandom(69), bundles[2]]  # the aggregator's own for party 2
    with pytest.raises(SignatureError, match="bundle of party 2 relayed by the aggregator"):
        check_peers(me.pinned, bundles=swapped, **kwargs)
    with pytest.raises(SignatureError, match="two parties"):  # one hospital named twice
        check_peers(me.pinned, bundles=bundles, **{**kwargs, "signers": [names[0]] * 3})
    with pytest.raises(SignatureError):  # an endorsement from another session (a replay)
        check_peers(me.pinned, bundles=bundles, **{**kwargs, "session": "s2"})
    with pytest.raises(SignatureError, match="not a hospital pinned"):
        check_peers(me.pinned, bundles=bundles, **{**kwargs, "signers": [*names[:2], "x"]})
