"""Mode "embeddings" with differential privacy: the head's sensitivity bound holds on
neighbouring data sets, the aggregator adds the noise inside the ciphertexts (the hospitals
decrypt the noise-free head plus exactly that noise; the aggregator only ever holds
ciphertexts), and the reported epsilon meets the target."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import medfed
from medfed.config import ConfigError
from medfed.crypto.context import make_secret_context, secret_context_bytes
from medfed.crypto.diagonal import pack_diagonal, plan_diagonal, sum_packed
from medfed.crypto.params import PRESETS
from medfed.crypto.seal import SealEngine, SealVec
from medfed.experiments.references import plaintext_reference
from medfed.fl import messages as M
from medfed.fl import workspace as W
from medfed.fl.aggregator import AggregatorSettings, EmbeddingsAggregator
from medfed.fl.hospital import make_hospital_app
from medfed.fl.local_grid import LocalGrid
from medfed.privacy import mechanisms
from medfed.privacy.mechanisms import HospitalDP
from medfed.privacy.sensitivity import (
    OutputNoise,
    SensitivityError,
    clip_rows,
    head_bound,
)
from medfed.train.diagonal.backend import blocks_from_packed
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.epoch import head_matrix, perturb_head, train_diagonal
from medfed.train.diagonal.plain import PlainDiagonalBackend
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid
from tests.conftest import linear_hospitals, synthetic_hospitals
from tests.fl_helpers import provision_signed
from tests.test_threat_model import ALLOWED_REPLY_KEYS, _values


@pytest.mark.parametrize(("degree", "radius"), [(1, 8.0), (3, 8.0), (3, 24.0), (5, 24.0)])
def test_the_bound_holds_on_the_whole_range(degree, radius):
    approx = fit_sigmoid(degree, radius)
    b = head_bound(approx.coeffs, approx.radius, 1.0)
    assert 0 < b.radius <= radius
    z = np.linspace(-b.radius, b.radius, 20001)
    p = approx(z)
    slope = np.gradient(p, z)
    assert slope.min() >= -1e-9 and slope.max() <= b.slope + 1e-9  # increasing, curvature
    assert max(np.abs(p).max(), np.abs(1 - p).max()) <= b.residual + 1e-12
    if degree == 3:  # p' = a1 + 3 a3 z^2 reaches 0 where the range ends
        a1, a3 = approx.coeffs[1], approx.coeffs[3]
        assert b.radius == pytest.approx(min(radius, math.sqrt(-a1 / (3 * a3))))
    with pytest.raises(SensitivityError, match="--l2"):
        b.check(lr=1.0, l2=b.min_l2 / 2)
    with pytest.raises(SensitivityError, match="--lr"):
        b.check(lr=2 * b.max_lr(b.min_l2), l2=b.min_l2)


def test_a_polynomial_that_is_not_a_sigmoid_fit_is_refused():
    with pytest.raises(SensitivityError, match="odd powers"):
        head_bound((0.5, 0.2, 0.1, 0.0), 8.0, 1.0)
    with pytest.raises(SensitivityError, match="increase"):
        head_bound((0.5, -0.2, 0.0, 0.0), 8.0, 1.0)
    with pytest.raises(SensitivityError, match="clip"):
        head_bound((0.5, 0.2, 0.0, 0.0), 8.0, 0.0)


def test_clip_rows_bounds_norms_and_keeps_short_rows():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    assert np.allclose(clip_rows(x, 1.0), [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]])


def _train(x, y, schedule, slots=256, bucket=32):
    """The encrypted path's loop on numpy (one hospital): the head and its largest |z|."""
    layout = plan_diagonal(
        [-(-len(x) // bucket)], slots=slots, n_classes=2, bucket=bucket, n_features=x.shape[1]
    )
    backend = PlainDiagonalBackend(layout)
    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks_from_packed(sum_packed([pack_diagonal(x, y, layout, 0)]), layout)
    head = head_matrix(*train_diagonal(backend, [compute], layout, schedule), layout)
    return head, layout.n_padded


@pytest.mark.parametrize("seed", range(4))
def test_replacing_one_record_moves_the_head_within_its_sensitivity(seed):
    """Adversarial neighbours: rows on the clip sphere, the replaced record's label flipped;
    the schedule at the bound's edge (smallest l2, largest lr)."""
    rng = np.random.default_rng(seed)
    clip, n, d = 1.0, 60, 6
    approx = fit_sigmoid(3, 8.0)
    bound = head_bound(approx.coeffs, approx.radius, clip)
    l2 = bound.min_l2
    lr = bound.max_lr(l2)
    schedule = HeadSchedule(12, lr, approx, l2, penalize_bias=True)
    x = clip_rows(rng.normal(size=(n, d)) * 5, clip)
    y = (x[:, 0] > 0).astype(np.int64)
    x2, y2 = x.copy(), y.copy()
    x2[0] = clip_rows(rng.normal(size=(1, d)) * 5, clip)[0]
    y2[0] = 1 - y[0]
    a, n_padded = _train(x, y, schedule)
    b, _ = _train(x2, y2, schedule)
    limit = bound.sensitivity(lr, l2, schedule.epochs, n_padded, heads=1)
    assert np.linalg.norm(a - b) <= limit
    assert np.linalg.norm(a - b) > limit / 50  # the bound is not vacuous here
    for head, feats in ((a, x), (b, x2)):  # every |z| stayed where the polynomial is valid
        assert np.linalg.norm(head) <= bound.weight_radius(l2) + 1e-9
        assert np.abs(feats @ head[:-1] + head[-1]).max() <= bound.radius


def test_noise_added_inside_ciphertexts_is_what_the_key_holder_decrypts():
    params = PRESETS["fast"]
    engine = SealEngine(make_secret_context(params))
    layout = plan_diagonal([4], slots=params.slots, n_classes=3, bucket=32, n_features=10)
    rng = np.random.default_rng(0)
    head = rng.normal(size=(layout.n_features + 1, layout.n_heads))
    noise = rng.normal(size=head.shape)
    plain_w, plain_b = perturb_head(
        [[np.zeros(layout.slots)] * layout.n_groups] * layout.n_heads,
        [np.zeros(layout.slots)] * layout.n_heads,
        layout,
        head,
    )
    enc_w = [[engine.encrypt(v) for v in wk] for wk in plain_w]
    enc_b = [engine.encrypt(v) for v in plain_b]
    noisy_w, noisy_b = perturb_head(enc_w, enc_b, layout, noise)
    assert all(isinstance(v, SealVec) for v in [*noisy_b, *(v for wk in noisy_w for v in wk)])
    got = head_matrix(
        [[engine.decrypt(v) for v in wk] for wk in noisy_w],
        [engine.decrypt(v) for v in noisy_b],
        layout,
    )
    assert np.allclose(got, head + noise, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        perturb_head(enc_w, enc_b, layout, noise[:-1])


@pytest.fixture(scope="module")
def dp_federation(tmp_path_factory):
    """Three hospitals, DP on, the statistics' noise off (so the plaintext twin sees the same
    feature map) and the aggregator's noise seeded (so the test knows it)."""
    params = PRESETS["fast"]
    hospitals = synthetic_hospitals(n_hospitals=3, n=150, d=8)
    approx = fit_sigmoid(3, 8.0)
    bound = head_bound(approx.coeffs, approx.radius, 1.0)
    schedule = HeadSchedule(3, 1.0, approx, bound.min_l2, penalize_bias=True)
    dp = HospitalDP(noise_multiplier=4.0, contributors=3, clip=1.0)
    ws = tmp_path_factory.mktemp("ws")
    meta = {
        "bucket": 32,
        "n_classes": 2,
        "ckks": "fast",
        "feature_scale": 1.0,
        "dp": dp.to_dict(),
    }
    signing = provision_signed(
        ws, hospitals, secret_context_bytes(make_secret_context(params)), meta
    )
    settings = AggregatorSettings(
        params=params,
        schedule=schedule,
        n_classes=2,
        n_features=8,
        bucket=32,
        expected_hospitals=3,
        signing=signing,
        dp=OutputNoise(dp.noise_multiplier, bound),
    )
    grid = LocalGrid(make_hospital_app(ws), 3)
    aggregator = EmbeddingsAggregator(settings)
    aggregator.noise_rng = lambda: np.random.default_rng(7)
    held = []  # what the aggregator holds of the head, just before it adds the noise
    add_noise = aggregator.add_noise
    aggregator.add_noise = lambda w: held.append(w) or add_noise(w)
    original = HospitalDP.stats_std
    HospitalDP.stats_std = lambda self: 0.0
    try:
        result = aggregator.run(grid)
    finally:
        HospitalDP.stats_std = original
    twin = plaintext_reference(hospitals, 2, schedule, params.slots, 32, 1.0, dp_clip=1.0)
    return aggregator, grid, ws, result, twin, held


def test_the_aggregator_holds_the_head_only_as_ciphertexts(dp_federation):
    aggregator, grid, _, result, _, held = dp_federation
    assert not aggregator.ctx.is_private()
    (weights,) = held
    assert all(isinstance(v, SealVec) for wk in weights[0] for v in wk)
    assert all(isinstance(v, SealVec) for v in weights[1])
    n_items = 0
    for reply in grid.received:  # what it received: ciphertexts, keys and coarse counts
        assert set(reply.content[M.RECORD].keys()) <= ALLOWED_REPLY_KEYS
        for key, item in _values(reply):
            assert not isinstance(item, float), key  # no plaintext numbers at all
            if isinstance(item, bytes) and key in (M.FEATURES, M.LABELS, M.STATS, M.SUMS):
                aggregator.engine.from_bytes(item, sender="test", item=key)  # a ciphertext
                n_items += 1
    assert n_items > 0
    assert result["dp_output"]["std"] > 0


def test_hospitals_decrypt_the_noise_free_head_plus_the_aggregators_noise(dp_federation):
    aggregator, _, ws, result, twin, _ = dp_federation
    L = aggregator.layout
    out = result["dp_output"]
    noise = np.random.default_rng(7).normal(0.0, out["std"], (L.n_features + 1, L.n_heads))
    assert out["sensitivity"] == pytest.approx(
        aggregator.s.dp.bound.sensitivity(
            aggregator.s.schedule.lr, aggregator.s.schedule.l2, 3, L.n_padded, L.n_heads
        )
    )
    for ev in W.read_evaluations(ws, 3):
        got = np.asarray(ev["weights"])
        assert np.allclose(got, twin["plaintext_weights"] + noise, atol=2e-3)
        assert np.abs(got - twin["plaintext_weights"]).max() > 50 * 2e-3  # noise is there


def test_dp_knobs_are_checked_in_both_modes():
    with pytest.raises(ConfigError, match="dp_clip"):
        medfed.SimulationConfig(dp_epsilon=1.0, dp_clip=0.0)
    with pytest.raises(ConfigError, match="not both"):
        medfed.SimulationConfig(dp_epsilon=1.0, dp_noise=2.0)
    medfed.SimulationConfig(dp_epsilon=1.0)  # mode embeddings takes it


def test_smaller_epsilon_costs_accuracy_in_mode_embeddings(monkeypatch):
    seeds = itertools.count(1)  # deterministic noise, for a reproducible test only
    monkeypatch.setattr(mechanisms.secrets, "randbits", lambda bits: next(seeds))
    hospitals = linear_hospitals(600, 16, label_noise=0.5)
    runs = {}
    for eps in (None, 8.0, 0.5):
        cfg = medfed.SimulationConfig(
            hospitals=3, epochs=10, lr=1.0, l2=0.0, components=0, sigmoid_radius=8.0,
            dp_epsilon=eps, backend="local", progress=False,
        )  # fmt: skip
        runs[eps] = medfed.federate(cfg, hospitals)
    assert runs[None]["dp"] is None
    assert runs[8.0]["dp"]["epsilon"] <= 8.0 and runs[0.5]["dp"]["epsilon"] <= 0.5
    assert runs[0.5]["dp"]["releases"] == 2
    # measured: 0.805, 0.767, 0.548 (tuned reference 0.845); 200 test samples, so a
    # 5-point step is 10 samples
    assert runs[None]["accuracy"] > runs[8.0]["accuracy"] > runs[0.5]["accuracy"] + 0.1
    assert runs[8.0]["accuracy"] > runs[None]["reference_accuracy"] - 0.15
    for eps in (8.0, 0.5):  # the head memorizes nothing it could leak: attack near chance
        assert abs(runs[eps]["mia_auc"] - 0.5) < 0.1
    assert runs[0.5]["leakage"]["released_head"]["epsilon"] == runs[0.5]["dp"]["epsilon"]
    assert runs[0.5]["l2"] >= runs[0.5]["dp"]["bound"]["min_l2"]  # the schedule the bound needs
