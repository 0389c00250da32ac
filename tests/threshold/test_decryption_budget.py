"""The threshold decryption budget: every party counts the partial decryptions it actually makes,
per key share, and refuses the one beyond ``max_decryptions`` (the tau the flooding noise was
sized for). Runs only where `openfhe` imports (tests/threshold/README.md)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from medfed.crypto.threshold import (  # noqa: E402
    ThresholdBudgetError,
    ThresholdError,
    _unpack_partials,
)

pytestmark = pytest.mark.openfhe

BUDGET = 3


@pytest.fixture(scope="module")
def small_budget(federation, test_params):
    """3 hospitals (t = 2) whose flooding is sized for BUDGET decryptions per key share."""
    return federation(replace(test_params.with_parties(3, 2), max_decryptions=BUDGET))


def test_each_partial_decryption_made_counts_and_the_one_beyond_is_refused(small_budget):
    fed = small_budget
    p1, p2, p3 = fed.parties
    assert p1.decryptions == {1: 0} and p1.decryptions_left == BUDGET
    aggregate = fed.aggregator.add([p.encrypt(np.full(4, 0.5)) for p in fed.parties])
    for k in range(1, BUDGET + 1):  # the same aggregate again: each one is a fresh flooding
        envelope = p1.partial_decrypt(aggregate)
        assert p1.decryptions == {1: k} and p1.decryptions_left == BUDGET - k
    got = p1.fuse(
        aggregate, [envelope, p2.partial_decrypt(aggregate), p3.partial_decrypt(aggregate)]
    )
    assert np.max(np.abs(got[:4] - 1.5)) <= fed.context.tolerance  # fusing is not counted
    assert p2.decryptions == {2: 1} and p3.decryptions == {3: 1}
    with pytest.raises(ThresholdBudgetError, match=rf"has made {BUDGET} partial decryptions"):
        p1.partial_decrypt(aggregate)
    assert p1.decryptions == {1: BUDGET}  # a refused decryption is not made, nor counted
    assert issubclass(ThresholdBudgetError, ThresholdError)


def test_a_malformed_aggregate_spends_nothing(small_budget):
    p3 = small_budget.party(3)
    before = p3.decryptions
    with pytest.raises(ThresholdError, match="not an OpenFHE ciphertext"):
        p3.partial_decrypt(b"\x00 not a ciphertext")
    assert p3.decryptions == before


def test_a_recovered_share_counts_from_the_recoverers_own_count(federation, test_params):
    fed = federation(replace(test_params.with_parties(3, 2), max_decryptions=BUDGET))
    p1, p2, p3 = fed.parties
    aggregate = fed.aggregator.add([p.encrypt(np.full(4, 0.25)) for p in fed.parties])
    for p in fed.parties:  # one round with everybody
        p.partial_decrypt(aggregate)
    sealed = {3: p3.recovery_share(1, p2.index, round=9)}  # hospital 1 drops out
    p2.recover_key(1, sealed, round=9)
    assert p2.decryptions == {1: 1, 2: 1}  # share 1 made one decryption before it dropped
    envelope = p2.partial_decrypt(aggregate)  # one partial decryption per share it holds
    assert sorted(share for share, _ in _unpack_partials(envelope)[1]) == [1, 2]
    assert p2.decryptions == {1: 2, 2: 2} and p2.decryptions_left == BUDGET - 2
    p2.partial_decrypt(aggregate)
    with pytest.raises(ThresholdBudgetError, match="key share 1 has made 3"):
        p2.partial_decrypt(aggregate)
    assert p3.decryptions == {3: 1}  # each party counts only what it made
