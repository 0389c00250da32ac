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
