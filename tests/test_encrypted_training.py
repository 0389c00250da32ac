"""Encrypted training against the plaintext reference, with stated tolerances."""

import numpy as np
import pytest

from medfed.crypto.context import CiphertextError, decrypt, encrypt, load_ciphertext
from medfed.crypto.keyholder import sum_masked_slots
from medfed.crypto.packing import pack_hospital, plan_layout, replicate, segment_sums
from medfed.train.encrypted import EncryptedBackend
from medfed.train.head import HeadSchedule, PlainBackend, train_head, weights_matrix
from medfed.train.poly import fit_sigmoid

# CKKS at the "fast" preset (scale 2^30) carries ~1e-5 absolute error per slot; after a few
# epochs of updates the weights agree with the plaintext path to well under 1e-2.
WEIGHT_TOL = 5e-3


def _blocks(layout, hospitals, n_classes, to_vec):
    cols = layout.n_columns
    xb = [[None] * cols for _ in range(layout.n_blocks)]
    yb = [None] * layout.n_blocks
    for i, (x, y) in enumerate(hospitals):
        for b, (xs, ys) in pack_hospital(x, y, n_classes, layout, i).items():
            for j in range(cols):
                v = to_vec(xs[j])
                xb[b][j] = v if xb[b][j] is None else xb[b][j] + v
            v = to_vec(ys)
            yb[b] = v if yb[b] is None else yb[b] + v
    return xb, yb


class LocalKeyHolder:
    def __init__(self, secret, layout, params):
        self.secret, self.layout, self.params = secret, layout, params
        self.seen = []

    def sum_masked(self, masked, step):
        self.seen.append(
            [
                decrypt(
                    self.secret,
                    load_ciphertext(self.secret, b, size=self.layout.slots, sender="agg", item="m"),
                )
                for b in masked
            ]
        )
        return sum_masked_slots(self.secret, masked, self.layout, self.params), "hospital-0"


@pytest.mark.parametrize("n_classes,degree", [(2, 3), (3, 3), (2, 1)])
def test_encrypted_head_matches_plaintext(keys, params, n_classes, degree):
    secret, public = keys
    rng = np.random.default_rng(1)
    d = 6
    data = [(rng.normal(size=(n, d)) / np.sqrt(d), rng.integers(0, n_classes, n)) for n in (50, 70)]
    layout = plan_layout([2, 3], slots=params.slots, n_classes=n_classes, bucket=32, n_features=d)
    schedule = HeadSchedule(epochs=4, lr=2.0, approx=fit_sigmoid(degree, 8.0))

    def enc(v):
        return load_ciphertext(
            public, encrypt(secret, v).serialize(), size=params.slots, sender="h", item="x"
        )

    xp, yp = _blocks(layout, data, n_classes, lambda v: v)
    xe, ye = _blocks(layout, data, n_classes, enc)
    levels_before = [c.data.ciphertext()[0].coeff_modulus_size() for c in xe[0]]
    w_plain = weights_matrix(train_head(PlainBackend(layout), xp, yp, layout, schedule), layout)
    keyholder = LocalKeyHolder(secret, layout, params)
    backend = EncryptedBackend(public, params, layout, keyholder)
    w_enc_ct = train_head(backend, xe, ye, layout, schedule)
    w_enc = weights_matrix([decrypt(secret, w) for w in w_enc_ct], layout)

    assert np.abs(w_enc - w_plain).max() < WEIGHT_TOL
    assert np.abs(w_plain).max() > 10 * WEIGHT_TOL  # the comparison is not vacuous
    # training must not drain the stored features' levels (TenSEAL mod-switches in place)
    assert [c.data.ciphertext()[0].coeff_modulus_size() for c in xe[0]] == levels_before
    # the key holder only ever saw masked values: far larger than any gradient product
    seen = np.concatenate([np.concatenate(s) for s in keyholder.seen])
    assert np.median(np.abs(seen)) > 2 ** (params.mask_bits - 2)
    assert len(backend.records) == schedule.epochs


def test_masked_sum_round_is_exact_within_ckks_error(keys, params):
    secret, public = keys
    layout = plan_layout([4], slots=params.slots, n_classes=3, bucket=32, n_features=1)
    rng = np.random.default_rng(2)
    values = np.zeros(params.slots)
    values[: 3 * layout.seg_size] = rng.normal(size=3 * layout.seg_size) * 1e-2
    ct = encrypt(public, values)
    mask = rng.uniform(-(2**params.mask_bits), 2**params.mask_bits, params.slots)
    reply = sum_masked_slots(secret, [(ct + mask.tolist()).serialize()], layout, params)[0]
    g = load_ciphertext(public, reply, size=params.slots, sender="h", item="s")
    got = decrypt(secret, g - replicate(segment_sums(mask, layout), layout).tolist())
    want = replicate(segment_sums(values, layout), layout)
    # summing 1,3xx masked slots accumulates ~1e-5 error per slot
    assert np.abs(got - want).max() < 5e-2


def test_keyholder_rejects_ciphertext_under_foreign_key(keys, params):
    from medfed.crypto.context import make_secret_context

    secret, public = keys
    other = make_secret_context(params)
    layout = plan_layout([1], slots=params.slots, n_classes=2, bucket=32, n_features=1)
    foreign = encrypt(other, np.ones(params.slots)).serialize()
    with pytest.raises(CiphertextError, match="not encrypted under this consortium's key"):
        sum_masked_slots(secret, [foreign], layout, params)
