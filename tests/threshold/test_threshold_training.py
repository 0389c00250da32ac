"""Encrypted training under threshold keys: the diagonal epoch on joint-key ciphertexts
(OpenFHE) against the same schedule on numpy.

Every epoch's updates are refreshed collectively (interactive multiparty bootstrapping: no
party decrypts them). Tolerance: the refresh adds about 2^-31; the final threshold decryption
adds the flooding noise (``context.tolerance`` per slot at most, about 0.03, its standard
deviation an eighth of that) and a weight is the mean of its 128 slot copies, so the head
matches numpy to 0.01.
"""

from __future__ import annotations

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from medfed.crypto.diagonal import pack_diagonal, plan_diagonal, sum_packed  # noqa: E402
from medfed.crypto.threshold import THRESHOLD_PRESETS  # noqa: E402
from medfed.crypto.threshold.evaluator import ThresholdEngine  # noqa: E402
from medfed.crypto.threshold.refresh import InProcessRefresher  # noqa: E402
from medfed.train.diagonal.backend import blocks_from_packed  # noqa: E402
from medfed.train.diagonal.compute import DiagonalCompute  # noqa: E402
from medfed.train.diagonal.epoch import head_matrix, train_diagonal  # noqa: E402
from medfed.train.diagonal.plain import PlainDiagonalBackend  # noqa: E402
from medfed.train.diagonal.threshold import (  # noqa: E402
    ThresholdDiagonalBackend,
    threshold_rotation_steps,
)
from medfed.train.head import HeadSchedule  # noqa: E402
from medfed.train.poly import fit_sigmoid  # noqa: E402
from tests.threshold.conftest import make_federation  # noqa: E402
from tests.threshold.test_eval_keys import joint_eval_keys  # noqa: E402

pytestmark = pytest.mark.openfhe


def _data(n_hospitals=3, n=40, d=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    xs, ys = [], []
    for _ in range(n_hospitals):
        x = rng.normal(size=(n, d)) / np.sqrt(d)
        xs.append(x)
        ys.append((x @ w + 0.3 * rng.normal(size=n) > 0).astype(np.int64))
    return xs, ys


def test_threshold_training_matches_the_plaintext_schedule():
    xs, ys = _data()
    slots = THRESHOLD_PRESETS["training"].batch_size
    layout = plan_diagonal([2, 2, 2], slots=slots, n_classes=2, bucket=32, n_features=8)
    fed = make_federation(THRESHOLD_PRESETS["training"].with_parties(3, 2))
    joint_eval_keys(fed, threshold_rotation_steps(layout))
    engine = ThresholdEngine(fed.aggregator)
    schedule = HeadSchedule(3, 2.0, fit_sigmoid(3, 8.0), l2=0.05)
    packs = [pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(zip(xs, ys, strict=True))]

    plain = PlainDiagonalBackend(layout)
    compute = DiagonalCompute(plain, layout)
    compute.blocks = blocks_from_packed(sum_packed(packs), layout)
    expected = head_matrix(*train_diagonal(plain, [compute], layout, schedule), layout)

    refresher = InProcessRefresher(fed.aggregator, fed.parties)
    backend = ThresholdDiagonalBackend(engine, layout, refresher)
    compute = DiagonalCompute(backend, layout)

    def encrypt(v):  # (the hospitals' blocks, summed: the aggregator's sum of theirs)
        return engine.from_bytes(fed.party(1).encrypt(v))

    compute.blocks = blocks_from_packed(sum_packed(packs), layout, encrypt)
    w, b = train_diagonal(backend, [compute], layout, schedule)
    lead = fed.party(1)

    def decrypt(v):
        ready = fed.aggregator.for_decryption(engine.to_bytes(v))
        return lead.fuse(ready, [p.partial_decrypt(ready) for p in fed.parties])

    got = head_matrix([[decrypt(v) for v in wk] for wk in w], [decrypt(v) for v in b], layout)
    assert refresher.rounds == schedule.epochs * (layout.n_groups + 1) * layout.n_heads
    assert np.max(np.abs(got - expected)) < 0.01, (got, expected)
    assert np.max(np.abs(expected)) > 0.2  # it learned something to compare
