"""The refresh masks: a ChaCha20 stream of uniform floats, and the run's union bound in bits."""

import math

import numpy as np
import pytest

from medfed.crypto.masking import (
    MASK_KINDS,
    MaskStream,
    draw_mask,
    mask_rng,
    refresh_security,
    security_bits,
)


def test_masks_are_uniform_on_the_mask_range():
    bits, n = 14, 400_000
    bound = 2.0**bits
    m = draw_mask(mask_rng(), n, bits)
    assert m.shape == (n,) and m.dtype == np.float64
    assert -bound < m.min() < -0.999 * bound and 0.999 * bound < m.max() < bound
    sd_mean = bound / math.sqrt(3 * n)  # the mean of n uniforms on (-bound, bound)
    assert abs(m.mean()) < 6 * sd_mean
    assert m.var() == pytest.approx(bound**2 / 3, rel=0.01)
    counts, _ = np.histogram(m, bins=16, range=(-bound, bound))
    expected = n / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 15 degrees of freedom: p ~ 1e-5
    assert len(np.unique(m)) == n  # 53 random bits per value: no repeats


def test_fresh_streams_differ_and_a_key_reproduces_its_stream():
    assert not np.array_equal(MaskStream().uniform(1.0, 64), MaskStream().uniform(1.0, 64))
    key = bytes(range(32))
    a, b = MaskStream(key=key), MaskStream(key=key)
    first = a.uniform(1.0, 100)
    assert np.array_equal(first, b.uniform(1.0, 100))
    assert np.array_equal(a.uniform(1.0, 8192), b.uniform(1.0, 8192))  # and stays in step
    assert not np.array_equal(first, a.uniform(1.0, 100))  # the stream moves on
    other_nonce = MaskStream(key=key, nonce=b"\x01" * 16).uniform(1.0, 100)
    assert not np.array_equal(first, other_nonce)
    # a split draw is the same stream: 8 keystream bytes per value, none skipped
    c = MaskStream(key=key)
    assert np.array_equal(np.concatenate([c.uniform(1.0, 30), c.uniform(1.0, 70)]), first)


def test_a_stream_needs_a_full_key_and_nonce():
    with pytest.raises(ValueError, match="32-byte key"):
        MaskStream(key=b"short")
    with pytest.raises(ValueError, match="16-byte nonce"):
        MaskStream(key=bytes(32), nonce=bytes(12))


def test_security_bits_is_minus_log2_of_the_union_bound():
    assert security_bits(2.0**5, 14) == pytest.approx(10.0)  # 2^5 / 2^15
    assert security_bits(1.0, 14) == pytest.approx(15.0)
    assert security_bits(0.0, 14) == math.inf


def _plain(products, bias, weights=0.0, g=2):
    return {
        "abs": {"products": products, "bias": bias, "weights": weights},
        "vectors": {"products": g, "bias": 1, "weights": g if weights else 0},
    }


def _sent(g=2, weights=True, bits=14, slots=8192):
    masked = {"products": g, "bias": 1, "weights": g if weights else 0}
    return {"mask_bits": bits, "masked": masked, "masked_slots": sum(masked.values()) * slots}


def test_refresh_security_sums_every_round_and_kind():
    plain = [_plain(2.0, 1.0, 4.0), _plain(6.0, 3.0, 4.0)]
    sec = refresh_security(plain, [_sent(), _sent()])
    assert sec["refresh_security_bits"] == pytest.approx(15 - math.log2(20.0))
    by_kind = sec["refresh_security_bits_by_kind"]
    assert list(by_kind) == list(MASK_KINDS)
    assert by_kind == pytest.approx({"products": 12.0, "bias": 13.0, "weights": 12.0})
    assert sec["refresh_masked_vectors"] == {"products": 4, "bias": 2, "weights": 4}
    assert sec["refresh_masked_slots"] == 10 * 8192 and sec["refresh_mask_bits"] == 14
    # without the L2 penalty no weights are masked: no bound for them
    sec = refresh_security([_plain(2.0, 2.0)], [_sent(weights=False)])
    assert sec["refresh_security_bits_by_kind"]["weights"] is None
    assert sec["refresh_security_bits"] == pytest.approx(13.0)


def test_refresh_security_refuses_a_twin_that_masked_something_else():
    with pytest.raises(ValueError, match="2 refresh rounds"):
        refresh_security([_plain(1.0, 1.0)] * 2, [_sent()])
    with pytest.raises(ValueError, match="masked 2 products vectors, the encrypted run sent 3"):
        refresh_security([_plain(1.0, 1.0, 1.0)], [_sent(g=3)])
    with pytest.raises(ValueError, match="several widths"):
        refresh_security([_plain(1.0, 1.0, 1.0)] * 2, [_sent(), _sent(bits=15)])
