"""The refresh masks: uniform integers from a ChaCha20 stream, their width, and the run's
union bound in bits."""

import math

import numpy as np
import pytest

from medfed.crypto.masking import (
    MASK_KINDS,
    MAX_MASK_PARTS,
    MaskStream,
    coefficient_l1_bound,
    draw_mask,
    mask_bits_for,
    mask_key,
    refresh_security,
    security_bits,
)


@pytest.mark.parametrize("bits", [14, 63, 110, 150])
def test_masks_are_uniform_integers_on_the_mask_range(bits):
    n = 200_000
    m = draw_mask(mask_key(), bits, n)
    assert m.shape == (n,) and m.dtype == object
    assert all(isinstance(v, int) for v in m[:100])
    lo, hi = -(2**bits), 2**bits
    assert lo <= min(m) and max(m) < hi
    assert min(m) < 0.999 * lo and max(m) > 0.999 * hi  # the whole range is reached
    x = np.array([v / 2**bits for v in m], dtype=np.float64)  # on [-1, 1)
    assert abs(x.mean()) < 6 / math.sqrt(3 * n)
    assert x.var() == pytest.approx(1 / 3, rel=0.01)
    counts, _ = np.histogram(x, bins=16, range=(-1, 1))
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 50  # 15 degrees of freedom: p ~ 1e-5
    low = np.array([v & 0xFF for v in m[:50_000]])  # the low bits are uniform too
    assert np.bincount(low, minlength=256).min() > 100


def test_fresh_keys_differ_and_a_key_reproduces_its_mask():
    key = bytes(range(32))
    first = draw_mask(key, 110, 100)
    assert list(first) == list(draw_mask(key, 110, 100))
    assert list(first) != list(draw_mask(mask_key(), 110, 100))
    assert list(MaskStream(key=key, nonce=b"\x01" * 16).integers(110, 100)) != list(first)
    a = MaskStream(key=key)
    assert list(a.integers(110, 100)) == list(first)
    assert list(a.integers(110, 100)) != list(first)  # the stream moves on


def test_a_stream_needs_a_full_key_and_nonce():
    with pytest.raises(ValueError, match="32-byte key"):
        MaskStream(key=b"short")
    with pytest.raises(ValueError, match="16-byte nonce"):
        MaskStream(key=bytes(32), nonce=bytes(12))


def test_mask_width_leaves_room_for_every_part_and_the_message():
    for bits in (90.0, 119.7, 160.2):
        b = mask_bits_for(bits)
        assert MAX_MASK_PARTS * 2**b * 2 <= 2 ** math.floor(bits) / 4  # parts + message < q/4
        assert b >= math.floor(bits) - 9


def test_the_coefficient_bound_holds_for_real_encodings():
    """``sum |p_i| <= 2 * scale * sum |z|`` for the CKKS encoding of any slot values."""
    from medfed.crypto.coefficients import Coefficients, crt_lift
    from medfed.crypto.context import make_secret_context
    from medfed.crypto.params import PRESETS
    from medfed.crypto.seal import SealEngine

    engine = SealEngine(make_secret_context(PRESETS["fast"]))
    coeffs = Coefficients(engine)
    rng = np.random.default_rng(0)
    one_slot = np.eye(1, engine.slots, 5).ravel()
    for z in (rng.normal(size=engine.slots) * 1e-3, one_slot, np.full(engine.slots, 0.25)):
        res = coeffs.from_ntt(coeffs.plaintext_residues(engine.encode(z), 0), 0)
        l1 = float(sum(abs(int(v)) for v in crt_lift(res, coeffs.primes[0])))
        message = 2 * engine.scale * float(np.abs(z).sum())
        assert l1 <= coefficient_l1_bound(float(np.abs(z).sum()), 1, engine.scale, coeffs.n)
        if z is one_slot:  # one slot is the tight case: |p_i| ~ |cos|, mean 2/pi of the bound
            assert l1 > 0.6 * message


def test_security_bits_is_minus_log2_of_the_union_bound():
    assert security_bits(2.0**5, 14) == pytest.approx(10.0)  # 2^5 / 2^15
    assert security_bits(1.0, 14) == pytest.approx(15.0)
    assert security_bits(0.0, 14) == math.inf


def _plain(products, bias, g=2):
    return {"abs": {"products": products, "bias": bias}, "vectors": {"products": g, "bias": 1}}


def _sent(g=2, bits=110, n=16384, scale=2.0**30):
    masked = {"products": g, "bias": 1}
    return {
        "mask_bits": bits,
        "scale": scale,
        "ring": n,
        "masked": masked,
        "masked_coefficients": sum(masked.values()) * n,
    }


def test_refresh_security_sums_every_round_and_kind():
    plain = [_plain(2.0, 1.0), _plain(6.0, 3.0)]
    sec = refresh_security(plain, [_sent(), _sent()])
    n, scale = 16384, 2.0**30

    def bits(abs_sum, vectors):
        return 111 - math.log2(2 * scale * abs_sum + vectors * n * (0.5 + 2.0**16))

    assert sec["refresh_security_bits"] == pytest.approx(
        111 - math.log2(2 * scale * 12.0 + 6 * n * (0.5 + 2.0**16))
    )
    by_kind = sec["refresh_security_bits_by_kind"]
    assert list(by_kind) == list(MASK_KINDS)
    assert by_kind == pytest.approx({"products": bits(8.0, 4), "bias": bits(4.0, 2)})
    assert sec["refresh_masked_vectors"] == {"products": 4, "bias": 2}
    assert sec["refresh_masked_coefficients"] == 6 * n and sec["refresh_mask_bits"] == 110


def test_refresh_security_refuses_a_twin_that_masked_something_else():
    with pytest.raises(ValueError, match="2 refresh rounds"):
        refresh_security([_plain(1.0, 1.0)] * 2, [_sent()])
    with pytest.raises(ValueError, match="masked 2 products vectors, the encrypted run sent 3"):
        refresh_security([_plain(1.0, 1.0)], [_sent(g=3)])
    with pytest.raises(ValueError, match="several widths"):
        refresh_security([_plain(1.0, 1.0)] * 2, [_sent(), _sent(bits=100)])
