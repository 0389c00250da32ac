"""What the aggregator receives: only public key material, ciphertexts and coarse counts."""

import pytest
import tenseal as ts

from medfed.crypto.context import make_secret_context, secret_context_bytes
from medfed.crypto.params import PRESETS
from medfed.fl import messages as M
from medfed.fl.aggregator import AggregatorSettings, EmbeddingsAggregator
from medfed.fl.hospital import make_hospital_app
from medfed.fl.local_grid import LocalGrid
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid
from tests.fl_helpers import ACK_REPLY_FIELDS, provision_signed

ALLOWED_REPLY_KEYS = {
    M.HOSPITAL,
    M.BUCKETS,
    M.STATS,
    M.PUBLIC_CONTEXT,
    M.KEY_FINGERPRINT,
    M.BLOCKS,
    M.FEATURES,
    M.LABELS,
    M.SUMS,
    M.OK,
    M.GALOIS_KEYS,
    M.MASKS,
    M.N_FEATURES,  # the embedding dimension, public anyway
    M.ROUND_ID,  # the aggregator's nonce, echoed
    M.DIGEST,  # SHA-256 of the reply (integrity, no secret)
    M.SIGNATURE,  # Ed25519 signature of the reply by the hospital's pinned key (64 bytes)
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, make_hospitals_module):
    params = PRESETS["fast"]
    hospitals = make_hospitals_module(n_hospitals=3, n=203, d=8, n_classes=2)
    secret = make_secret_context(params)
    ws = tmp_path_factory.mktemp("ws")
    meta = {"bucket": 32, "n_classes": 2, "ckks": "fast", "feature_scale": 1.0}
    signing = provision_signed(ws, hospitals, secret_context_bytes(secret), meta)
    settings = AggregatorSettings(
        params=params,
        schedule=HeadSchedule(2, 2.0, fit_sigmoid(3, 8.0)),
        n_classes=2,
        n_features=8,
        bucket=32,
        expected_hospitals=3,
        signing=signing,
    )
    grid = LocalGrid(make_hospital_app(ws), 3)
    strategy = EmbeddingsAggregator(settings)
    result = strategy.run(grid)
    return strategy, grid, hospitals, secret, result


@pytest.fixture(scope="module")
def make_hospitals_module():
    from tests.conftest import synthetic_hospitals

    return synthetic_hospitals


def _values(reply):
    for key, value in reply.content[M.RECORD].items():
        for item in value if isinstance(value, list) else [value]:
            yield key, item


def test_aggregator_holds_no_secret_key(federation):
    strategy, *_ = federation
    assert not strategy.ctx.is_private()
    with pytest.raises(ValueError, match="(?i)secret key"):
        strategy.ctx.secret_key()


def test_every_byte_payload_is_public_context_or_ciphertext(federation):
    strategy, grid, *_ = federation
    n_bytes = 0
    for reply in grid.received:
        assert set(reply.content[M.RECORD].keys()) <= ALLOWED_REPLY_KEYS
        for key, item in _values(reply):
            assert isinstance(item, bytes | str | int), (key, type(item))
            assert not isinstance(item, float), key  # no plaintext numbers at all
            if isinstance(item, bytes):
                n_bytes += 1
                if key == M.SIGNATURE:  # Ed25519, verified in the run: no key, no data
                    assert len(item) == 64
                elif key == M.PUBLIC_CONTEXT:
                    assert not ts.context_from(item).is_private()
                elif key == M.GALOIS_KEYS:
                    strategy.engine._load_galois(item)  # parses as Galois (public) keys
                else:  # parses as a ciphertext under the run's parameters
                    strategy.engine.from_bytes(item, sender="test", item=key)
    assert n_bytes > 0


def test_ciphertexts_do_not_decrypt_with_the_aggregators_context(federation):
    from medfed.crypto.context import KeyMaterialError

    strategy, grid, *_ = federation
    blob = next(item for r in grid.received for k, item in _values(r) if k == M.FEATURES)
    vec = strategy.engine.from_bytes(blob, sender="test", item="x")
    assert strategy.engine.decryptor is None
    with pytest.raises(KeyMaterialError, match="secret key"):
        strategy.engine.decrypt(vec)


def test_exact_sample_counts_never_reach_the_aggregator(federation):
    _, grid, hospitals, _, result = federation
    counts = {len(h.train_labels) for h in hospitals} | {len(h.test_labels) for h in hospitals}
    assert all(c % 32 for c in counts), "test data must not be bucket-aligned"
    for reply in grid.received:
        for key, item in _values(reply):
            if isinstance(item, int):
                assert item not in counts, f"{key}={item} equals a hospital's sample count"
    buckets = [
        r.content[M.RECORD][M.BUCKETS] for r in grid.received if M.BUCKETS in r.content[M.RECORD]
    ]
    assert sorted(buckets) == sorted(-(-len(h.train_labels) // 32) for h in hospitals)


def test_hospitals_evaluate_privately_and_reply_only_an_ack(federation):
    _, grid, *_ = federation
    finals = [r for r in grid.received if M.OK in r.content[M.RECORD]]
    assert len(finals) == 3
    for r in finals:
        assert set(r.content[M.RECORD].keys()) == ACK_REPLY_FIELDS
