"""Threshold key setup signed end to end (issue 20): an aggregator that swaps a hospital's
channel bundle or the joint public key while relaying them is caught by the hospitals.

Each test also runs the same attack with the hospitals' check disabled (monkeypatched to
accept anything) and shows what the swap would have given the aggregator: the control fails
against the unsigned relay that came before.
"""

from __future__ import annotations

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from test_updates_threshold import make_hospitals, run_federation  # noqa: E402

import medfed.fl.ciphers.threshold.hospital as TH  # noqa: E402
from medfed.crypto.channel import Identity, channel_context, open_sealed  # noqa: E402
from medfed.crypto.threshold import ThresholdContext  # noqa: E402
from medfed.crypto.threshold.wire import PURPOSE_KEY_SHARE  # noqa: E402
from medfed.fl import messages as M  # noqa: E402
from medfed.fl.ciphers import forget_threshold_parties, unframe  # noqa: E402
from medfed.fl.updates import UpdatesAggregator  # noqa: E402
from medfed.fl.workspace import ERRORS, hospital_dir  # noqa: E402

pytestmark = pytest.mark.openfhe

N = 3


def _attacker(seen: dict, swap):
    """An aggregator class that applies ``swap(payloads)`` to the key-share requests before
    signing them (it is the aggregator) and records every stage's payloads and replies."""

    class Swapping(UpdatesAggregator):
        def exchange(self, stage, payloads, message_type):
            if stage == "key-share":
                swap(payloads)
            seen[stage] = (payloads, None)
            replies = super().exchange(stage, payloads, message_type)
            seen[stage] = (payloads, replies)
            return replies

    return Swapping


def _errors(ws) -> str:
    return "".join(
        (hospital_dir(ws, i) / ERRORS).read_text()
        for i in range(N)
        if (hospital_dir(ws, i) / ERRORS).exists()
    )


def _swap_bundle(fake: Identity):
    def swap(payloads):
        for values in payloads.values():  # party 2's bundle -> the aggregator's own
            values[M.PEERS] = [
                fake.public_bundle() if k == 1 else b for k, b in enumerate(values[M.PEERS])
            ]

    return swap


def test_a_bundle_swapped_by_the_aggregator_is_refused(tmp_path):
    seen, fake = {}, Identity.generate()
    try:
        with pytest.raises(M.FederationError, match="key-share"):
            run_federation(
                tmp_path,
                make_hospitals(N, n=240),
                aggregator=_attacker(seen, _swap_bundle(fake)),
            )
    finally:
        forget_threshold_parties(tmp_path)
    assert seen["key-share"][1] == {}  # no hospital accepted the swapped bundle
    assert "the bundle of party 2 relayed by the aggregator is not the one" in _errors(tmp_path)


def test_control_without_the_check_the_swapped_bundle_opens_a_key_share(tmp_path, monkeypatch):
    """The same swap against the unsigned relay: the aggregator opens the Shamir share of
    party 1's key share that party 1 sealed for party 2."""

    def accept_any(pinned, *, bundles, **_):
        return {k + 1: bytes(b) for k, b in enumerate(bundles)}

    monkeypatch.setattr(TH, "check_peers", accept_any)
    seen, fake = {}, Identity.generate()
    try:
        with pytest.raises(M.FederationError):  # party 2 cannot open what was sealed to fake
            run_federation(
                tmp_path,
                make_hospitals(N, n=240),
                aggregator=_attacker(seen, _swap_bundle(fake)),
            )
    finally:
        forget_threshold_parties(tmp_path)
    joins, joined = seen["key-join"]
    party = {node: int(values[M.PARTY]) for node, values in joins.items()}
    session = str(next(iter(joins.values()))[M.SESSION])
    lead = next(n for n, p in party.items() if p == 1)
    shares = seen["key-share"][1][lead]
    blob = next(b for r, b in zip(shares[M.RECIPIENTS], shares[M.SEALED], strict=True) if r == 2)
    context = channel_context(session, 0, "party-1", "party-2", PURPOSE_KEY_SHARE)
    assert open_sealed(fake, bytes(joined[lead][M.BUNDLE]), bytes(blob), context)


def _own_key(seen: dict, keys: dict):
    """Swap the joint public key for one the aggregator made (it keeps the secret key)."""

    def swap(payloads):
        raw = seen["key-context"][1]
        ctx = ThresholdContext.from_bytes(bytes(next(iter(raw.values()))[M.THRESHOLD_CONTEXT]))
        pair = ctx._cc.KeyGen()
        keys.update(context=ctx, secret=pair.secretKey)
        for values in payloads.values():
            values[M.PUBLIC_KEY] = ctx._serialize(pair.publicKey)

    return swap


def test_a_joint_key_swapped_by_the_aggregator_is_refused(tmp_path):
    seen, keys = {}, {}
    try:
        with pytest.raises(M.FederationError, match="key-share"):
            run_federation(
                tmp_path, make_hospitals(N, n=240), aggregator=_attacker(seen, _own_key(seen, keys))
            )
    finally:
        forget_threshold_parties(tmp_path)
    assert seen["key-share"][1] == {} and "stats" not in seen
    assert "the key-chain of party 3 relayed by the aggregator is not the one" in _errors(tmp_path)


def test_control_without_the_check_the_aggregator_decrypts_the_statistics(tmp_path, monkeypatch):
    """The same swap against the unsigned relay: the hospitals encrypt their statistics under
    the aggregator's key, and it decrypts them alone."""
    monkeypatch.setattr(TH, "check_endorsement", lambda *a, **k: None)
    seen, keys = {}, {}
    hospitals = make_hospitals(N, n=240)
    try:
        with pytest.raises(M.FederationError):  # its own sum check then fails: no matter
            run_federation(tmp_path, hospitals, aggregator=_attacker(seen, _own_key(seen, keys)))
    finally:
        forget_threshold_parties(tmp_path)
    replies = seen["stats"][1]
    assert len(replies) == N
    cc, secret = keys["context"]._cc, keys["secret"]
    sums = []
    for reply in replies.values():
        (part,) = unframe(bytes(reply[M.UPDATE]))
        plain = cc.Decrypt(keys["context"]._ciphertext(part, "stats"), secret)
        plain.SetLength(3)
        sums.append(plain.GetRealPackedValue()[0] / TH.ThresholdHospital.stats_scale)
    # a hospital's plaintext feature sum (first slot of its statistics), read by the aggregator
    expected = sorted(float(h.train_features[:, 0].sum()) for h in hospitals)
    np.testing.assert_allclose(sorted(sums), expected, rtol=1e-3)
