"""Encrypted diagonal training against the plaintext reference, with stated tolerances."""

import os

import numpy as np
import pytest

from medfed.crypto.coefficients import Coefficients, crt_lift
from medfed.crypto.context import CiphertextError, KeyMaterialError, make_secret_context
from medfed.crypto.diagonal import pack_diagonal, plan_diagonal, sum_packed
from medfed.crypto.masking import (
    NOISE_ALLOWANCE_BITS,
    coefficient_l1_bound,
    draw_mask,
    mask_key,
    refresh_security,
)
from medfed.crypto.packing import n_buckets
from medfed.crypto.seal import SealEngine
from medfed.train.diagonal.backend import blocks_from_packed
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.encrypted import EncryptedDiagonalBackend, galois_steps
from medfed.train.diagonal.epoch import head_matrix, train_diagonal
from medfed.train.diagonal.keyholder import hospital_sums
from medfed.train.diagonal.plain import PlainDiagonalBackend
from medfed.train.diagonal.planner import plan_shares
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid

# CKKS at the "fast" preset (N = 16384, scale 2^40) carries ~1e-8 absolute error per slot;
# summing products over the 128 repeats per feature (all 8192 slots for the bias) gives ~1e-6
# per update. Weights after a few epochs agree with the plaintext path to within this absolute
# tolerance (measured: ~5e-6 after 10 epochs on 2000 samples).
WEIGHT_TOL = 1e-4


class KeyHolder:
    def __init__(self, engine, layout):
        self.engine, self.layout = engine, layout
        self.coeffs = Coefficients(engine)
        self.seen = []

    def sum_masked(self, masked, step):
        self.seen.append(  # the exact integers the key holder decrypts
            [
                self.coeffs.decrypt_integers(self.engine.from_bytes(b, sender="a", item="m").ct)
                for b in masked
            ]
        )
        return hospital_sums(self.engine, masked, self.layout), "hospital-0"


@pytest.fixture(scope="module")
def engines(params):
    secret = make_secret_context(params)
    from medfed.crypto.context import load_public_context, public_context_bytes

    hospital = SealEngine(secret)
    public = load_public_context(public_context_bytes(secret))
    return hospital, public


@pytest.mark.parametrize(
    "n_classes,degree,parts,l2",
    [(2, 3, 1, 0.0), (3, 3, 1, 0.0), (2, 1, 1, 0.0), (2, 3, 2, 0.0), (4, 3, 2, 0.0)]
    + [(2, 3, 1, 0.05), (3, 3, 2, 0.05)],  # the L2 penalty's masked weights round
)
def test_encrypted_head_matches_plaintext(engines, params, n_classes, degree, parts, l2):
    hospital, public = engines
    rng = np.random.default_rng(n_classes + degree)
    d, sizes = 40, [60, 90]
    data = [(rng.normal(size=(s, d)) / np.sqrt(d), rng.integers(0, n_classes, s)) for s in sizes]
    layout = plan_diagonal(
        [n_buckets(s, 32) for s in sizes],
        slots=params.slots,
        n_classes=n_classes,
        bucket=32,
        n_features=d,
    )
    aggregator = SealEngine(public, galois_keys=hospital.make_galois_keys(galois_steps(layout)))
    assert not aggregator.private

    def enc(v):
        return aggregator.from_bytes(hospital.to_bytes(hospital.encrypt(v)), sender="h", item="x")

    raw = sum_packed(pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(data))
    enc_blocks = blocks_from_packed(raw, layout, enc)
    plain_blocks = blocks_from_packed(raw, layout)
    schedule = HeadSchedule(epochs=4, lr=4.0, approx=fit_sigmoid(degree, 8.0), l2=l2)
    keyholder = KeyHolder(hospital, layout)
    backend = EncryptedDiagonalBackend(aggregator, layout, keyholder)
    computes = []
    for _ in range(parts):
        c = DiagonalCompute(backend, layout)
        c.blocks = enc_blocks
        computes.append(c)
    w, b = train_diagonal(backend, computes, layout, schedule)

    def dec(v):
        return hospital.decrypt(hospital.from_bytes(aggregator.to_bytes(v), sender="a", item="w"))

    got = head_matrix([[dec(v) for v in wk] for wk in w], [dec(v) for v in b], layout)
    plain_backend = PlainDiagonalBackend(layout)
    plain = DiagonalCompute(plain_backend, layout)
    plain.blocks = plain_blocks
    pw, pb = train_diagonal(plain_backend, [plain], layout, schedule)
    want = head_matrix(pw, pb, layout)

    assert np.abs(got - want).max() < WEIGHT_TOL
    assert np.abs(want).max() > 10 * WEIGHT_TOL  # the comparison is not vacuous
    # the key holder only ever saw masked integers, as wide as the masks (2^B each)
    mask_bits = backend.records[0]["mask_bits"]
    assert mask_bits >= 100  # fast: 120 bits left at the refresh
    seen = np.concatenate([np.concatenate(s) for s in keyholder.seen])
    assert float(np.median(np.abs(seen))) > 2.0 ** (mask_bits - 2)
    assert int(np.max(np.abs(seen))) <= 2**mask_bits * (1 + parts)
    assert len(backend.records) == schedule.epochs
    # one folded vector per group and one bias vector per head, however many parts computed;
    # with an L2 penalty the weights join the products: no weight is ever sent
    per_head = layout.n_groups + 1
    assert all(len(s) == layout.n_heads * per_head for s in keyholder.seen)
    # the plaintext twin masks as many vectors of each kind as the key holder decrypted, and
    # its values are the unmasked ones: they bound the masks' statistical distance
    sec = refresh_security(plain_backend.records, backend.records)
    assert sum(sec["refresh_masked_vectors"].values()) == sum(len(s) for s in keyholder.seen)
    n = 2 * layout.slots
    assert sec["refresh_masked_coefficients"] == sum(len(s) for s in keyholder.seen) * n
    bits = sec["refresh_security_bits_by_kind"]
    assert sec["refresh_security_bits"] <= min(bits.values())
    assert sec["refresh_security_bits"] >= 40
    assert sec["refresh_mask_bits"] == mask_bits


def test_the_noise_allowance_holds_on_a_training_run(engines, params, monkeypatch):
    """What the key holder decrypts, less the masks, is the twin's encoded values plus noise
    below ``2**NOISE_ALLOWANCE_BITS`` per coefficient: the refresh bound's one allowance."""
    import medfed.train.diagonal.plain as plain_module

    hospital, public = engines
    rng = np.random.default_rng(11)
    d, sizes = 40, [60, 90]
    data = [(rng.normal(size=(s, d)) / np.sqrt(d), rng.integers(0, 2, s)) for s in sizes]
    layout = plan_diagonal(
        [n_buckets(s, 32) for s in sizes], slots=params.slots, n_classes=2, bucket=32, n_features=d
    )
    aggregator = SealEngine(public, galois_keys=hospital.make_galois_keys(galois_steps(layout)))

    def enc(v):
        return aggregator.from_bytes(hospital.to_bytes(hospital.encrypt(v)), sender="h", item="x")

    raw = sum_packed(pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(data))
    schedule = HeadSchedule(epochs=3, lr=4.0, approx=fit_sigmoid(3, 8.0), l2=0.05)
    keys = []

    def new_key():
        keys.append(mask_key())
        return keys[-1]

    keyholder = KeyHolder(hospital, layout)
    backend = EncryptedDiagonalBackend(aggregator, layout, keyholder, new_key=new_key)
    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks_from_packed(raw, layout, enc)
    train_diagonal(backend, [compute], layout, schedule)
    twin, original = [], plain_module.keyholder_sums

    def recorded(q, qb, lay):  # the twin's values of every vector the key holder decrypts
        twin.append([*q, qb])
        return original(q, qb, lay)

    monkeypatch.setattr(plain_module, "keyholder_sums", recorded)
    plain_backend = PlainDiagonalBackend(layout)
    plain = DiagonalCompute(plain_backend, layout)
    plain.blocks = blocks_from_packed(raw, layout)
    train_diagonal(plain_backend, [plain], layout, schedule)

    coeffs = Coefficients(hospital)
    per_round = layout.n_groups + 1  # one head, one compute: keys in the key holder's order
    assert len(keys) == len(twin) * per_round == schedule.epochs * per_round
    worst = 0
    for r, (seen, values) in enumerate(zip(keyholder.seen, twin, strict=True)):
        bits = backend.records[r]["mask_bits"]
        for y, key, z in zip(seen, keys[r * per_round :], values, strict=False):
            p_e = y - draw_mask(key, bits, coeffs.n)
            encoded = coeffs.from_ntt(coeffs.plaintext_residues(hospital.encode(z), 0), 0)
            noise = p_e - crt_lift(encoded, coeffs.primes[0])
            worst = max(worst, int(np.max(np.abs(noise))))
            l1 = float(sum(abs(int(c)) for c in p_e))
            assert l1 <= coefficient_l1_bound(float(np.abs(z).sum()), 1, params.scale, coeffs.n)
    assert 0 < worst < 2**NOISE_ALLOWANCE_BITS
    print(f"largest |noise| per coefficient: 2^{np.log2(worst):.1f}")


def test_seeded_encryption_round_trips_at_half_the_bytes(engines, params):
    hospital, public = engines
    aggregator = SealEngine(public)
    values = np.random.default_rng(0).normal(size=params.slots)
    seeded = hospital.encrypt_bytes(values)
    full = hospital.to_bytes(hospital.encrypt(values))
    assert len(seeded) < 0.6 * len(full)
    loaded = aggregator.from_bytes(seeded, sender="hospital-0", item="x")
    back = hospital.decrypt(hospital.from_bytes(aggregator.to_bytes(loaded), sender="a", item="x"))
    assert np.abs(back - values).max() < 1e-6  # fresh CKKS error at scale 2^40: ~1e-9
    with pytest.raises(KeyMaterialError, match="secret key"):
        aggregator.encrypt_bytes(values)


def test_keyholder_rejects_ciphertexts_under_a_foreign_key(engines, params):
    hospital, _ = engines
    other = SealEngine(make_secret_context(params))
    layout = plan_diagonal([1], slots=params.slots, n_classes=2, bucket=32, n_features=4)
    per_head = layout.n_groups + 1
    foreign = [other.to_bytes(other.encrypt(np.ones(params.slots)))] * per_head
    with pytest.raises(CiphertextError, match="outside the mask range"):
        hospital_sums(hospital, foreign, layout)


def test_malformed_ciphertext_bytes_are_rejected(engines, params):
    hospital, _ = engines
    good = hospital.to_bytes(hospital.encrypt(np.zeros(params.slots)))
    for bad in (b"", b"garbage" * 10, good[: len(good) // 2]):
        with pytest.raises(CiphertextError, match="not a valid ciphertext"):
            hospital.from_bytes(bad, sender="hospital-1", item="feature 3")


# binary over 3 blocks: cells and units split, residuals exchanged, contested cells through
# the node's claim file or the ClaimDesk actor; 4 classes: whole heads; 5 classes over 3 blocks:
# 2 + 2 whole heads, and the fifth split by blocks (two shares on each worker)
@pytest.mark.parametrize(
    ("n_classes", "n", "claims"),
    [(2, 17000, "auto"), (2, 17000, "desk"), (4, 100, "auto"), (5, 17000, "auto")],
)
def test_ray_workers_equal_in_process_within_ckks_tolerance(engines, params, n_classes, n, claims):
    """Two long-lived Ray actors (public keys only) give the single-process result."""
    from medfed.crypto.scratch import shared_dir
    from medfed.scale.cluster import ray_session
    from medfed.scale.workers import NODE_CLAIMS, start_workers, stop_workers

    hospital, public = engines
    from medfed.crypto.context import public_context_bytes

    rng = np.random.default_rng(7)
    d = 24
    x = rng.normal(size=(n, d)) / np.sqrt(d)
    y = (x @ rng.normal(size=(d, n_classes))).argmax(axis=1)  # learnable labels
    layout = plan_diagonal(
        [n_buckets(n, 32)], slots=params.slots, n_classes=n_classes, bucket=32, n_features=d
    )
    galois = hospital.make_galois_keys(galois_steps(layout))
    aggregator = SealEngine(public, galois_keys=galois)
    packed = [b for _, b in sorted(pack_diagonal(x, y, layout, 0).items())]
    assert len(packed) == (3 if n > 2 * params.slots else 1)

    def enc(v):
        return aggregator.from_bytes(hospital.to_bytes(hospital.encrypt(v)), sender="h", item="x")

    blocks = blocks_from_packed(packed, layout, enc)
    if n_classes == 2:  # the workers take contested cells
        assert all(sh.contests for sh in plan_shares(layout, 2, len(blocks)))
    if n_classes == 5:
        assert [sh.compute for sh in plan_shares(layout, 2, len(blocks))] == [0, 1, 0, 1]
    schedule = HeadSchedule(epochs=2, lr=4.0, approx=fit_sigmoid(3, 8.0))
    keyholder = KeyHolder(hospital, layout)
    backend = EncryptedDiagonalBackend(aggregator, layout, keyholder)
    local = DiagonalCompute(backend, layout)
    local.blocks = blocks

    def dec(v):
        return hospital.decrypt(hospital.from_bytes(aggregator.to_bytes(v), sender="a", item="w"))

    def head(result):
        w, bias = result
        return head_matrix([[dec(v) for v in wk] for wk in w], [dec(v) for v in bias], layout)

    want = head(train_diagonal(backend, [local], layout, schedule))
    with ray_session(None, num_cpus=2):
        pub_bytes = public_context_bytes(public)
        remotes = start_workers(2, aggregator, pub_bytes, galois, layout, blocks, claims=claims)
        try:
            # one node: the claim file (already unlinked: it goes away with the workers)
            assert (remotes[0].desk is NODE_CLAIMS) == (claims == "auto")
            assert not [f for f in os.listdir(shared_dir()) if f.startswith("medfed-claims-")]
            got = head(train_diagonal(backend, remotes, layout, schedule))
        finally:
            stop_workers(remotes)
    assert np.abs(got - want).max() < WEIGHT_TOL
    assert np.abs(want).max() > 10 * WEIGHT_TOL  # the comparison is not vacuous
