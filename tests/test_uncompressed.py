"""Uncompressed ciphertext bytes: what SEAL's own save would write, without zstd."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sa

from medfed.crypto import uncompressed
from medfed.crypto.context import CiphertextError, load_public_context, make_secret_context
from medfed.crypto.context import public_context_bytes as public_bytes
from medfed.crypto.seal import SealEngine, SealVec


@pytest.fixture(scope="module")
def engines(params):
    secret = make_secret_context(params)
    hospital = SealEngine(secret)
    galois = hospital.make_galois_keys([1])
    return hospital, SealEngine(load_public_context(public_bytes(secret)), galois_keys=galois)


def _variants(aggregator: SealEngine, v: SealVec):
    """Fresh, rotated, lower-level and three-component (unrelinearized) ciphertexts."""
    yield v
    yield aggregator.rotate(v, 1)
    for level in range(1, len(aggregator.parms_ids)):
        yield aggregator.mod_switch_to_level(v, level)
    three = sa.Ciphertext()
    aggregator.ev.multiply(v.ct, v.ct, three)
    yield SealVec(aggregator, three)


def test_uncompressed_bytes_load_to_the_same_ciphertext(engines, params):
    hospital, aggregator = engines
    values = np.random.default_rng(0).normal(size=params.slots)
    v = aggregator.from_bytes(hospital.encrypt_bytes(values), sender="h", item="x")
    for c in _variants(aggregator, v):
        raw = uncompressed.save_uncompressed(c.ct)
        assert raw is not None, "this SEAL build's ciphertext layout was not recognised"
        back = aggregator.from_bytes(raw, sender="worker", item="x")
        assert back.ct.size() == c.ct.size() and back.level == c.level
        assert back.ct.scale == c.ct.scale
        # the same object: SEAL's compressed bytes of both are identical
        assert aggregator.to_bytes(back) == aggregator.to_bytes(c)
        assert raw[5] == 0 and aggregator.to_bytes(c)[5] != 0  # the header's compression mode
    blob = aggregator.to_uncompressed_bytes(v)
    got = hospital.decrypt(hospital.from_bytes(blob, sender="aggregator", item="x"))
    assert np.abs(got - values).max() < 1e-6  # fresh CKKS error at scale 2^40: ~1e-9


def test_an_unrecognised_layout_falls_back_to_seal_save(engines, params, monkeypatch):
    _, aggregator = engines
    v = aggregator.encrypt(np.ones(params.slots))
    monkeypatch.setattr(uncompressed._Memory, "read", lambda self, address, size: None)
    assert uncompressed.save_uncompressed(v.ct) is None
    assert aggregator.to_uncompressed_bytes(v) == aggregator.to_bytes(v)


def test_a_field_that_does_not_match_is_not_trusted(engines, params, monkeypatch):
    _, aggregator = engines
    v = aggregator.encrypt(np.ones(params.slots))
    real = uncompressed._Memory.read

    def wrong_size(self, address, size):  # the object's size field reads 7, not 2
        data = real(self, address, size)
        if data is not None and size == uncompressed._ARRAY + 24:
            data = data[:40] + (7).to_bytes(8, "little") + data[48:]
        return data

    monkeypatch.setattr(uncompressed._Memory, "read", wrong_size)
    assert uncompressed.save_uncompressed(v.ct) is None


def test_corrupt_uncompressed_bytes_are_rejected(engines, params):
    _, aggregator = engines
    raw = bytearray(aggregator.to_uncompressed_bytes(aggregator.encrypt(np.ones(params.slots))))
    raw[-8:] = b"\xff" * 8  # a coefficient above every prime of the chain
    with pytest.raises(CiphertextError, match="not a valid ciphertext"):
        aggregator.from_bytes(bytes(raw), sender="worker-1", item="rot(w)")
    with pytest.raises(CiphertextError, match="not a valid ciphertext"):
        aggregator.from_bytes(bytes(raw[: len(raw) // 2]), sender="worker-1", item="rot(w)")


def test_loads_reuse_one_file_without_mixing_in_earlier_bytes(engines, params):
    # loads write into one file in place: a shorter load after a longer one must neither read
    # the longer one's tail nor accept truncated or padded bytes
    hospital, aggregator = engines
    values = np.random.default_rng(1).normal(size=params.slots)
    big = aggregator.encrypt(values)
    aggregator.from_bytes(aggregator.to_uncompressed_bytes(big), sender="w", item="x")
    small = aggregator.to_bytes(aggregator.mod_switch_to_level(big, 2))
    back = aggregator.from_bytes(small, sender="w", item="x")
    blob = aggregator.to_bytes(back)
    got = hospital.decrypt(hospital.from_bytes(blob, sender="a", item="x"))
    assert np.abs(got - values).max() < 1e-3
    full = aggregator.to_uncompressed_bytes(big)
    aggregator.from_bytes(full, sender="w", item="x")
    for bad in (full[: len(full) - 8], small[: len(small) // 2], small + b"\0" * 8):
        with pytest.raises(CiphertextError, match="SEAL header states"):
            aggregator.from_bytes(bad, sender="worker-1", item="z")
