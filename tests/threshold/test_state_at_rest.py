"""A hospital's threshold state survives its process: stored (encrypted at rest), reloaded
elsewhere, it decrypts, recovers and counts its budget as the original would have."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openfhe")
pytestmark = pytest.mark.openfhe

from tests.threshold.conftest import make_federation  # noqa: E402


def _decrypt(fed, parties, aggregate: bytes) -> np.ndarray:
    partials = [p.partial_decrypt(aggregate) for p in parties]
    return parties[0].fuse(aggregate, partials, length=4)


def test_a_reloaded_party_decrypts_and_recovers_like_the_original(test_params):
    from medfed.crypto.threshold import ThresholdError, ThresholdParty

    fed = make_federation(test_params.with_parties(3, 2))
    x = np.array([0.5, -1.25, 2.0, 3.5])
    aggregate = fed.aggregator.add([p.encrypt(x) for p in fed.parties])
    restored = [ThresholdParty.from_secret_state(p.secret_state()) for p in fed.parties]
    assert [p.key_shares for p in restored] == [p.key_shares for p in fed.parties]
    assert restored[1].joint_public_key == fed.joint_public_key
    np.testing.assert_allclose(
        _decrypt(fed, restored, aggregate), 3 * x, atol=fed.context.tolerance
    )
    # a restored party still opens what peers seal to it, and counts its decryptions
    assert restored[0].decryptions == {1: 1}
    # Shamir recovery of party 3 by party 1 from party 2's share, both restored
    share = restored[1].recovery_share(3, 1, round=7)
    restored[0].recover_key(3, {2: share}, round=7)
    again = ThresholdParty.from_secret_state(restored[0].secret_state())
    assert again.key_shares == (1, 3)
    parts = [again.partial_decrypt(aggregate), restored[1].partial_decrypt(aggregate)]
    np.testing.assert_allclose(
        again.fuse(aggregate, parts, length=4), 3 * x, atol=fed.context.tolerance
    )
    with pytest.raises(ThresholdError, match="bad magic"):
        ThresholdParty.from_secret_state(b"nope" + again.secret_state())


def test_the_stored_state_is_encrypted_bound_to_its_hospital_and_outside_key(tmp_path, test_params):
    from medfed.crypto.errors import KeyMaterialError
    from medfed.fl.ciphers.threshold import at_rest

    fed = make_federation(test_params.with_parties(3, 2))
    state = fed.party(2).secret_state()
    for i in (0, 1):
        (tmp_path / f"hospital_{i}").mkdir()
    at_rest.store(tmp_path, 1, state)
    stored = at_rest.state_path(tmp_path, 1).read_bytes()
    assert at_rest.load(tmp_path, 1) == state
    # nothing of the plaintext state shows in the file: its key-share windows are absent
    for k in range(1, 8):
        window = state[k * len(state) // 8 :][:64]
        assert window not in stored
    assert at_rest.key_path(tmp_path, 1).parent != at_rest.state_path(tmp_path, 1).parent
    assert at_rest.state_path(tmp_path, 1).stat().st_mode & 0o777 == 0o600
    # another hospital's file (or a tampered one) is refused
    at_rest.state_path(tmp_path, 0).write_bytes(stored)
    with pytest.raises(KeyMaterialError, match="does not decrypt"):
        at_rest.load(tmp_path, 0)
    flipped = bytearray(stored)
    flipped[-1] ^= 1
    at_rest.state_path(tmp_path, 1).write_bytes(bytes(flipped))
    with pytest.raises(KeyMaterialError, match="does not decrypt"):
        at_rest.load(tmp_path, 1)


def test_a_hospital_cipher_resumes_from_its_stored_state_in_a_fresh_process(tmp_path):
    """What a second process serving the hospital sees: the cipher reloads the stored state."""
    from medfed.fl.ciphers.threshold import hospital as H

    (tmp_path / "hospital_0").mkdir()
    first = H.ThresholdHospital.for_hospital(str(tmp_path), 0)
    first.session, first._previous = "run-x", "hospital-3"
    first._pending = (b"aggregate", [b"own-0", b"own-1"])
    first._save()
    H.forget_threshold_parties(str(tmp_path))  # as if another process asked
    second = H.ThresholdHospital.for_hospital(str(tmp_path), 0)
    assert second is not first
    assert (second.session, second._previous) == ("run-x", "hospital-3")
    assert second._pending == (b"aggregate", [b"own-0", b"own-1"]) and second.party is None
