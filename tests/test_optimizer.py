"""The optimiser: the shared whitening feature map, the L2 step, and that heads really learn."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.crypto.diagonal import pack_diagonal, plan_diagonal, sum_packed
from medfed.crypto.packing import n_buckets
from medfed.data import load_dataset, resolve_dataset
from medfed.experiments.references import plaintext_reference
from medfed.experiments.updates_reference import fedavg_reference
from medfed.experiments.yardsticks import majority_accuracy, tuned_reference
from medfed.fl.hospital import stats_chunks
from medfed.fl.workspace import HospitalData
from medfed.train.diagonal.backend import blocks_from_packed
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.epoch import head_matrix, train_diagonal
from medfed.train.diagonal.plain import PlainDiagonalBackend
from medfed.train.head import HeadSchedule, predict
from medfed.train.normalization import (
    MIN_ACTIVE,
    active_components,
    feature_map_from_stats,
    shared_feature_map,
    stats_length,
    stats_vector,
)
from medfed.train.poly import fit_sigmoid


def test_summed_stats_give_the_pooled_whitening():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(20, 20)) * np.logspace(0, -3, 20)  # badly conditioned
    parts = [rng.normal(size=(n, 20)) @ mix.T + 5.0 for n in (30, 70, 100)]
    total = sum(stats_vector(p, 8) for p in parts)
    assert total.shape == (stats_length(20, 8),)
    fmap = feature_map_from_stats(total, 20, 8)
    pooled = fmap(np.vstack(parts))
    assert fmap.width == 8
    np.testing.assert_allclose(pooled.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(pooled.T @ pooled / len(pooled), np.eye(8), atol=1e-8)
    # the top components: what is left is the smallest share of the variance
    centred = np.vstack(parts) - np.vstack(parts).mean(0)
    ev = np.linalg.eigvalsh(np.cov(centred.T, bias=True))[::-1]
    assert ev[8:].sum() < 0.05 * ev.sum()


def test_rank_deficient_data_keep_the_public_width_with_zero_columns():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 10))  # rank 3 in 10 dimensions
    fmap = feature_map_from_stats(stats_vector(x, 6), 10, 6)
    assert fmap.width == 6
    assert np.count_nonzero(np.abs(fmap.projection).sum(0) > 0) == 3
    assert np.all(np.isfinite(fmap(x)))


def test_active_components_follow_the_pooled_sample_count():
    assert active_components(500, 192, 64) == MIN_ACTIVE  # small federations keep the floor
    assert active_components(10_000, 192, 64) == 156
    assert active_components(50_000, 192, 64) == 192  # never wider than the public width
    assert active_components(10, 48, 64) == 48
    assert active_components(10, 192, 0) == 192  # 0 keeps every component
    rng = np.random.default_rng(4)
    x = rng.normal(size=(MIN_ACTIVE * 3, 150)) * np.logspace(0, -1, 150)
    fmap = feature_map_from_stats(stats_vector(x, 120), 150, 120, samples_per_component=2)
    assert fmap.width == 120  # the public width does not move
    live = np.abs(fmap.projection).sum(0) > 0
    assert live.tolist() == [True] * 120  # 288 samples / 2 = 144 >= 120: all kept
    fmap = feature_map_from_stats(stats_vector(x, 120), 150, 120, samples_per_component=3)
    live = np.abs(fmap.projection).sum(0) > 0
    assert live.tolist() == [True] * MIN_ACTIVE + [False] * (120 - MIN_ACTIVE)  # 288 / 3 = 96
    np.testing.assert_allclose(fmap(x)[:, :MIN_ACTIVE].std(0), 1.0, atol=1e-6)


def test_feature_map_is_deterministic_and_sign_fixed():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 6))
    a = feature_map_from_stats(stats_vector(x, 4), 6, 4)
    b = feature_map_from_stats(stats_vector(x[::-1], 4), 6, 4)  # same sums, other order
    np.testing.assert_allclose(a.projection, b.projection, atol=1e-9)
    pivot = np.argmax(np.abs(a.projection), axis=0)
    assert np.all(a.projection[pivot, range(4)] > 0)


def test_standardize_only_without_components():
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(100, 5))
    fmap = feature_map_from_stats(stats_vector(x, 0), 5, 0)
    assert len(stats_vector(x, 0)) == stats_length(5, 0) == 11
    np.testing.assert_allclose(fmap(x).std(0) * np.sqrt(5), 1.0, atol=1e-5)


def test_stats_chunks_cover_the_vector():
    v = np.arange(10.0)
    chunks = stats_chunks(v, 4)
    assert len(chunks) == 3 and all(len(c) == 4 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks)[:10], v)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_plain_training_with_l2_equals_reference_gradient_descent(n_classes):
    rng = np.random.default_rng(4)
    d, sizes = 8, [40, 25]
    data = [(rng.normal(size=(s, d)), rng.integers(0, n_classes, s)) for s in sizes]
    layout = plan_diagonal(
        [n_buckets(s, 16) for s in sizes], slots=256, n_classes=n_classes, bucket=16, n_features=d
    )
    packed = sum_packed(pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(data))
    schedule = HeadSchedule(epochs=6, lr=2.0, approx=fit_sigmoid(3, 16.0), l2=0.1)
    compute = DiagonalCompute(PlainDiagonalBackend(layout), layout)
    compute.blocks = blocks_from_packed(packed, layout)
    w, b = train_diagonal(PlainDiagonalBackend(layout), [compute], layout, schedule)
    got = head_matrix(w, b, layout)

    x = np.vstack([x for x, _ in data])
    y = np.concatenate([y for _, y in data])
    heads = 1 if n_classes == 2 else n_classes
    t = y[:, None].astype(float) if heads == 1 else np.eye(n_classes)[y]
    want = np.zeros((d + 1, heads))
    x1 = np.hstack([x, np.ones((len(x), 1))])
    for _ in range(schedule.epochs):
        grad = x1.T @ (schedule.approx(x1 @ want) - t) / layout.n_padded
        grad[:-1] += schedule.l2 * want[:-1]
        want -= schedule.lr * grad
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert np.abs(want[:-1]).max() > 1e-2


@pytest.fixture(scope="module")
def breast_pixels() -> list[HospitalData]:
    """The shipped BreastMNIST (real images; raw pixels as the embedding) over 4 hospitals."""
    ds = load_dataset(resolve_dataset("breastmnist", None))
    (xtr, ytr), (xte, yte) = ds.split("train"), ds.split("test")
    xtr = xtr.reshape(len(xtr), -1).astype(np.float64) / 255
    xte = xte.reshape(len(xte), -1).astype(np.float64) / 255
    tr = np.array_split(np.random.default_rng(0).permutation(len(xtr)), 4)
    te = np.array_split(np.arange(len(xte)), 4)
    return [
        HospitalData(f"hospital-{i}", xtr[a], ytr[a], xte[b], yte[b])
        for i, (a, b) in enumerate(zip(tr, te, strict=True))
    ]


def _pooled(hospitals, split):
    x = np.vstack([getattr(h, f"{split}_features") for h in hospitals])
    y = np.concatenate([getattr(h, f"{split}_labels") for h in hospitals])
    return x, y


def test_default_schedule_learns_a_real_dataset(breast_pixels):
    """The default schedule (whitening, L2, the degree-3 polynomial) must not
    collapse to one class, and must come near a tuned logistic regression."""
    from medfed.config import SimulationConfig

    cfg = SimulationConfig()
    schedule = HeadSchedule(
        cfg.epochs, cfg.lr, fit_sigmoid(cfg.sigmoid_degree, cfg.sigmoid_radius), cfg.l2
    )
    ref = plaintext_reference(
        breast_pixels,
        2,
        schedule,
        4096,
        cfg.bucket,
        cfg.feature_scale,
        components=cfg.components,
        samples_per_component=cfg.samples_per_component,
    )
    test_x, test_y = _pooled(breast_pixels, "test")
    preds = predict(ref["plaintext_weights"], np.vstack(ref["plaintext_test"]))
    assert len(np.unique(preds)) == 2, "the head predicts a single class"
    train_x, train_y = _pooled(breast_pixels, "train")
    tuned = tuned_reference(train_x, train_y, test_x, test_y, 2, seed=0)
    majority = majority_accuracy(train_y, test_y)
    assert ref["plaintext_accuracy"] > majority + 0.03
    assert ref["plaintext_accuracy"] >= tuned["reference_accuracy"] - 0.03


def test_old_schedule_is_caught_predicting_one_class(breast_pixels):
    """The check above can fail: the previous default (standardized features, 30 epochs of
    step 2, no L2, radius 8) predicts one class on the same data."""
    schedule = HeadSchedule(30, 2.0, fit_sigmoid(3, 8.0))
    ref = plaintext_reference(breast_pixels, 2, schedule, 4096, 32, 1.0, components=0)
    fmap = shared_feature_map([h.train_features for h in breast_pixels], [0, 1, 2, 3], 0, 1.0)
    preds = predict(ref["plaintext_weights"], fmap(_pooled(breast_pixels, "test")[0]))
    assert len(np.unique(preds)) == 1


def test_updates_mode_default_schedule_learns(breast_pixels):
    from medfed.config import SimulationConfig

    cfg = SimulationConfig(mode="updates")
    ref = fedavg_reference(
        breast_pixels,
        2,
        cfg.rounds,
        cfg.local_epochs,
        cfg.lr,
        cfg.feature_scale,
        components=cfg.components,
        l2=cfg.l2,
        samples_per_component=cfg.samples_per_component,
    )
    train_x, train_y = _pooled(breast_pixels, "train")
    test_x, test_y = _pooled(breast_pixels, "test")
    tuned = tuned_reference(train_x, train_y, test_x, test_y, 2, seed=0)
    assert ref["plaintext_accuracy"] > majority_accuracy(train_y, test_y) + 0.03
    assert ref["plaintext_accuracy"] >= tuned["reference_accuracy"] - 0.03
