"""Joint evaluation keys for training under threshold keys: every party's share of the
relinearization and rotation keys, folded by the aggregator, lets it multiply and rotate
ciphertexts under the joint public key; t-of-n decryption of the results matches numpy.

Tolerance: ``context.tolerance`` per slot (8 standard deviations of the flooding noise),
measured by the context on a product chain as deep as the preset allows.
"""

from __future__ import annotations

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from medfed.crypto.threshold import THRESHOLD_PRESETS, ThresholdError  # noqa: E402
from tests.threshold.conftest import make_federation  # noqa: E402

pytestmark = pytest.mark.openfhe

STEPS = [1, 2, 4, -8, 64]


def joint_eval_keys(fed, steps=STEPS, dropped: int | None = None, recoverer=None) -> None:
    """Rounds A and B; in round B a recoverer answers for ``dropped`` with its share."""
    lead = fed.party(1).eval_key_share(steps)
    shares = [lead] + [p.eval_key_share(steps, lead) for p in fed.parties[1:]]
    switch = fed.aggregator.join_eval_key_shares(shares)
    mult = [
        recoverer.mult_key_share(switch, share=p.index) if p.index == dropped
        else p.mult_key_share(switch)
        for p in fed.parties
    ]  # fmt: skip
    fed.aggregator.join_mult_key_shares(mult)


def decrypt(fed, ct: bytes, holders, length: int) -> np.ndarray:
    fuser = holders[0]
    return fuser.fuse(ct, [p.partial_decrypt(ct) for p in holders], length=length)


@pytest.fixture(scope="module")
def trained():
    """3 hospitals (t = 2) on the training preset, with joint evaluation keys."""
    fed = make_federation(THRESHOLD_PRESETS["training"].with_parties(3, 2))
    joint_eval_keys(fed)
    return fed


def _circuit(fed, x, y):
    """What an epoch does: products to depth 4, rotations, sums (on the aggregator)."""
    cc = fed.aggregator.context._cc
    ctx = fed.aggregator.context
    cx = ctx._ciphertext(fed.party(2).encrypt(x), "x")
    cy = ctx._ciphertext(fed.party(3).encrypt(y), "y")
    xy = cc.EvalMult(cx, cy)
    xyx = cc.EvalMult(xy, cx)
    rotated = None
    for k in STEPS:
        r = cc.EvalRotate(xyx, k)
        rotated = r if rotated is None else cc.EvalAdd(rotated, r)
    deep = cc.EvalMult(cc.EvalMult(rotated, cy), cx)  # depth 4
    return {"xy": xy, "rotated": rotated, "deep": deep}


def _expected(x, y):
    xyx = x * y * x
    rotated = sum(np.roll(xyx, -k) for k in STEPS)
    return {"xy": x * y, "rotated": rotated, "deep": rotated * y * x}


def test_products_and_rotations_under_joint_keys_decrypt_t_of_n(trained):
    ctx = trained.aggregator.context
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, 0.5, ctx.slots), rng.uniform(-0.5, 0.5, ctx.slots)
    expected = _expected(x, y)
    for name, ct in _circuit(trained, x, y).items():
        ready = trained.aggregator.for_decryption(ctx._serialize(ct))
        got = decrypt(trained, ready, trained.parties, ctx.slots)
        assert np.max(np.abs(got - expected[name])) <= ctx.tolerance, name
    assert ctx.tolerance < 0.05


def test_parties_refuse_products_not_made_fit_for_decryption(trained):
    ctx = trained.aggregator.context
    raw = _circuit(trained, np.full(8, 0.5), np.full(8, 0.5))["xy"]
    assert raw.GetNoiseScaleDeg() == 2
    with pytest.raises(ThresholdError, match="scaling degree 2"):
        trained.party(1).partial_decrypt(ctx._serialize(raw))
    cc = ctx._cc
    cx = ctx._ciphertext(trained.party(1).encrypt(np.ones(8)), "x")
    unrelinearized = cc.EvalMultNoRelin(cx, cx)
    with pytest.raises(ThresholdError, match="3 elements"):
        trained.party(1).partial_decrypt(ctx._serialize(unrelinearized))


def test_a_dropout_after_round_a_is_covered_by_a_recovered_share():
    fed = make_federation(THRESHOLD_PRESETS["training"].with_parties(3, 2))
    lead = fed.party(1).eval_key_share(STEPS)
    shares = [lead] + [p.eval_key_share(STEPS, lead) for p in fed.parties[1:]]
    switch = fed.aggregator.join_eval_key_shares(shares)
    # party 2 drops out before round B; party 3 recovers its key share (t = 2: its own
    # Shamir share of it and party 1's)
    fed.party(3).recover_key(2, {1: fed.party(1).recovery_share(2, 3, round=5)}, round=5)
    mult = [
        fed.party(1).mult_key_share(switch),
        fed.party(3).mult_key_share(switch, share=2),
        fed.party(3).mult_key_share(switch),
    ]
    fed.aggregator.join_mult_key_shares(mult)
    ctx = fed.aggregator.context
    x = np.linspace(-0.5, 0.5, 16)
    cc = ctx._cc
    cx = ctx._ciphertext(fed.party(1).encrypt(x), "x")
    ready = fed.aggregator.for_decryption(ctx._serialize(cc.EvalRotate(cc.EvalMult(cx, cx), 1)))
    got = decrypt(fed, ready, [fed.party(1), fed.party(3)], 16)
    shifted = np.append((x * x)[1:], 0.0)  # the 16 values rotate within all the slots
    assert np.max(np.abs(got - shifted)) <= ctx.tolerance


def test_round_a_needs_every_party_and_the_same_steps(trained):
    fed = trained
    lead = fed.party(1).eval_key_share([1, 2])
    with pytest.raises(ThresholdError, match="steps"):
        fed.party(2).eval_key_share([1, 4], lead)
    with pytest.raises(ThresholdError, match="every key share"):
        fed.aggregator.join_eval_key_shares([lead, fed.party(2).eval_key_share([1, 2], lead)])
    with pytest.raises(ThresholdError, match="nonzero"):
        fed.party(1).eval_key_share([0, 1])


def test_the_engine_rotates_fresh_ciphertexts(trained):
    """A fresh (degree-1) ciphertext rotated by the aggregator's engine decrypts right: the
    preset's HYBRID key switching keeps its noise small (BV's would swamp it)."""
    from medfed.crypto.threshold.evaluator import ThresholdEngine

    engine = ThresholdEngine(trained.aggregator)
    ctx = trained.aggregator.context
    x = np.linspace(-1, 1, ctx.slots)
    v = engine.from_bytes(trained.party(2).encrypt(x))
    for k in (1, -8, 64):
        ready = trained.aggregator.for_decryption(engine.to_bytes(engine.rotate(v, k)))
        got = decrypt(trained, ready, trained.parties, ctx.slots)
        assert np.max(np.abs(got - np.roll(x, -k))) <= ctx.tolerance, k
