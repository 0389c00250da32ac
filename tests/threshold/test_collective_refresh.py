"""The collective refresh (OpenFHE's interactive multiparty bootstrapping, Mouchet et al.,
PETS 2021): every key share turns a computed ciphertext into a fresh top-level one under the
joint key; no party and not the aggregator decrypts it. Tolerance: ``context.tolerance`` per
slot for a flooded threshold decryption (the refresh itself adds about 2^-31)."""

from __future__ import annotations

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from medfed.crypto.threshold import THRESHOLD_PRESETS, ThresholdError  # noqa: E402
from medfed.crypto.threshold.refresh import InProcessRefresher  # noqa: E402
from tests.threshold.conftest import make_federation  # noqa: E402
from tests.threshold.test_eval_keys import decrypt, joint_eval_keys  # noqa: E402

pytestmark = pytest.mark.openfhe


@pytest.fixture(scope="module")
def fed():
    fed = make_federation(THRESHOLD_PRESETS["training"].with_parties(3, 2))
    joint_eval_keys(fed, [1])
    return fed


def _chain(fed, ct: bytes, y: bytes) -> bytes:
    """Depth 4 on the aggregator: ((ct * y) * y) * y * y, rotated."""
    ctx, cc = fed.aggregator.context, fed.aggregator.context._cc
    c, cy = ctx._ciphertext(ct, "ct"), ctx._ciphertext(y, "y")
    for _ in range(4):
        c = cc.EvalMult(c, cy)
    return ctx._serialize(cc.EvalRotate(c, 1))


def test_refreshed_ciphertexts_are_fresh_and_keep_their_values(fed):
    ctx = fed.aggregator.context
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, ctx.slots), rng.uniform(0.8, 1.0, ctx.slots)
    cy = fed.party(2).encrypt(y)
    ct, expected = fed.party(3).encrypt(x), x
    refresher = InProcessRefresher(fed.aggregator, fed.parties)
    for _ in range(3):  # three epochs: depth 4, refresh, depth 4 again on the fresh one
        ct = _chain(fed, ct, cy)
        expected = np.roll(expected * y**4, -1)
        (ct,) = refresher.refresh([ct], 0)
        fresh = ctx._ciphertext(ct, "refreshed")
        assert (fresh.GetLevel(), fresh.GetNoiseScaleDeg()) == (0, 1)
    got = decrypt(fed, fed.aggregator.for_decryption(ct), fed.parties, ctx.slots)
    assert np.max(np.abs(got - expected)) <= ctx.tolerance
    assert [p.refreshes for p in fed.parties] == [3, 3, 3]


def test_a_dropout_is_covered_by_a_recovered_share_and_fewer_are_refused():
    fed = make_federation(THRESHOLD_PRESETS["training"].with_parties(3, 2))
    joint_eval_keys(fed, [1])
    ctx = fed.aggregator.context
    x = np.linspace(-1, 1, ctx.slots)
    ct = _chain(fed, fed.party(1).encrypt(x), fed.party(1).encrypt(np.ones(ctx.slots)))
    survivors = [fed.party(1), fed.party(3)]
    with pytest.raises(ThresholdError, match=r"missing \[2\]"):
        InProcessRefresher(fed.aggregator, fed.parties, survivors).refresh([ct], 0)
    fed.party(3).recover_key(2, {1: fed.party(1).recovery_share(2, 3, round=9)}, round=9)
    (fresh,) = InProcessRefresher(fed.aggregator, fed.parties, survivors).refresh([ct], 0)
    got = decrypt(fed, fed.aggregator.for_decryption(fresh), survivors, ctx.slots)
    assert np.max(np.abs(got - np.roll(x, -1))) <= ctx.tolerance


def test_parties_refuse_a_common_element_party_1_did_not_make(fed):
    """With its own element (a = 0) the aggregator could add the shares up to a decryption."""
    agg = fed.aggregator
    ct = _chain(fed, fed.party(1).encrypt(np.ones(8)), fed.party(1).encrypt(np.ones(8)))
    _, c1 = agg.refresh_input(ct)
    a, sealed = fed.party(1).refresh_element(round=77)
    other, _ = fed.party(1).refresh_element(round=78)  # a valid element, but not this round's
    with pytest.raises(ThresholdError, match="not the one party 1 made"):
        fed.party(2).refresh_shares(c1, other, round=77, sealed_digest=sealed[2])
    with pytest.raises(ThresholdError, match="sealed digest"):
        fed.party(2).refresh_shares(c1, a, round=77)
    fed.party(2).refresh_shares(c1, a, round=77, sealed_digest=sealed[2])  # control
