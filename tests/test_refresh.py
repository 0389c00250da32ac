"""The exact refresh against plaintext references: coefficient I/O, automorphisms, the masked
round trip, and the noise allowance measured on a real training run."""

import numpy as np
import pytest

from medfed.crypto.coefficients import Coefficients, automorphism, crt_lift, reduce
from medfed.crypto.context import (
    CiphertextError,
    load_public_context,
    make_secret_context,
    public_context_bytes,
)
from medfed.crypto.masking import NOISE_ALLOWANCE_BITS, draw_mask, mask_key
from medfed.crypto.refresh import Refresh
from medfed.crypto.seal import SealEngine

# fresh CKKS error at the fast preset's scale 2^40 is ~2e-8 per slot (one fresh encryption);
# a refreshed vector carries the incoming noise plus one fresh encryption's
SLOT_TOL = 1e-7


@pytest.fixture(scope="module")
def parties(params):
    secret = make_secret_context(params)
    hospital = SealEngine(secret)
    steps = [1, 2, 64, 128]
    public = load_public_context(public_context_bytes(secret))
    aggregator = SealEngine(public, galois_keys=hospital.make_galois_keys(steps))
    return hospital, aggregator


def _send(src, dst, v):
    return dst.from_bytes(src.to_bytes(v), sender="test", item="x")


def test_integers_round_trip_exactly_at_every_level(parties):
    hospital, _ = parties
    coeffs = Coefficients(hospital)
    z = np.random.default_rng(0).normal(size=hospital.slots)
    v = hospital.encrypt(z)
    top = coeffs.decrypt_integers(v.ct)
    for level in range(1, len(coeffs.primes)):
        low = coeffs.decrypt_integers(hospital.mod_switch_to_level(v, level).ct)
        assert list(low) == list(top)  # mod switching keeps the integers (they are small)
    back = hospital.encoder.decode_double(coeffs.encode_integers(top, 0, v.ct.scale))
    assert np.abs(np.asarray(back) - z).max() < SLOT_TOL


def test_an_automorphism_is_the_slot_rotation(parties):
    hospital, aggregator = parties
    coeffs = Coefficients(hospital)
    z = np.random.default_rng(1).normal(size=hospital.slots)
    v = hospital.encrypt(z)
    ints = coeffs.decrypt_integers(v.ct)
    top = coeffs.primes[0]
    for step in (1, 64):
        mine = crt_lift(automorphism(reduce(ints, top), pow(3, step, 4 * hospital.slots), top), top)
        seal = coeffs.decrypt_integers(
            _send(aggregator, hospital, aggregator.rotate(_send(hospital, aggregator, v), step)).ct
        )
        diff = max(abs(int(a) - int(b)) for a, b in zip(mine, seal, strict=True))
        assert diff < 2**NOISE_ALLOWANCE_BITS  # key-switching noise only
        got = hospital.encoder.decode_double(coeffs.encode_integers(mine, 0, v.ct.scale))
        assert np.abs(np.asarray(got) - np.roll(z, -step)).max() < SLOT_TOL


@pytest.mark.parametrize("unit", [64, 1])
def test_masked_refresh_equals_the_plaintext_map(parties, unit):
    """Mask low in the chain, open and map, unmask: the plaintext sum of rotations, at the top
    level, with masks wider than any float could carry."""
    hospital, aggregator = parties
    slots = hospital.slots
    count = slots // unit
    z = np.random.default_rng(2).normal(size=slots) * 1e-2
    low = aggregator.mod_switch_to_level(_send(hospital, aggregator, hospital.encrypt(z)), 4)
    agg, holder = Refresh(aggregator), Refresh(hospital)
    keys = []
    masked = low
    for _ in range(2):  # two computes' masks add up
        key = mask_key()
        masked, bits = agg.mask(masked, key)
        keys.append((key, bits))
    assert bits >= 100
    seen = holder.open(_send(aggregator, hospital, masked))
    assert float(np.median(np.abs(seen.astype(float)))) > 2.0 ** (bits - 2)
    reply = holder.open_and_map(_send(aggregator, hospital, masked), unit, count)
    out = agg.unmask(aggregator.from_bytes(reply, sender="h", item="r"), keys, unit, count)
    assert out.level == 0
    got = hospital.decrypt(_send(aggregator, hospital, out))
    want = z.reshape(-1, unit).sum(axis=0) if unit > 1 else np.full(slots, z.sum())
    want = np.tile(want, count) if unit > 1 else want
    assert np.abs(got - want).max() < SLOT_TOL * count**0.5 + 1e-6 * np.abs(want).max()
    assert np.abs(want).max() > 100 * SLOT_TOL  # not vacuous


def test_a_foreign_key_fails_the_range_check(parties, params):
    hospital, _ = parties
    other = SealEngine(make_secret_context(params))
    foreign = other.mod_switch_to_level(other.encrypt(np.ones(other.slots)), 4)
    holder = Refresh(hospital)
    with pytest.raises(CiphertextError, match="outside the mask range"):
        holder.open(hospital.from_bytes(other.to_bytes(foreign), sender="a", item="x"))


def test_draw_mask_is_what_mask_added(parties):
    hospital, aggregator = parties
    coeffs = Coefficients(hospital)
    v = aggregator.mod_switch_to_level(_send(hospital, aggregator, hospital.encrypt(0.0)), 4)
    key = mask_key()
    masked, bits = Refresh(aggregator).mask(v, key)
    before = coeffs.decrypt_integers(_send(aggregator, hospital, v).ct)
    after = coeffs.decrypt_integers(_send(aggregator, hospital, masked).ct)
    assert list(after - before) == list(draw_mask(key, bits, coeffs.n))
