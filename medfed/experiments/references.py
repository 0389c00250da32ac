"""Plaintext yardsticks on the same split and seed.

``plaintext``: the encrypted path's exact arithmetic (same layout, padding, polynomial and
schedule) on numpy, so ``accuracy - plaintext_accuracy`` isolates encryption.
``exact``: logistic regression with the true sigmoid, same epochs and learning rate.
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.packing import n_buckets, pack_hospital, plan_layout
from medfed.fl.hospital import normalization_from_stats, normalize, stats_vector
from medfed.fl.workspace import HospitalData
from medfed.train.head import HeadSchedule, PlainBackend, accuracy, train_head, weights_matrix
from medfed.train.reference import train_exact_logreg


def normalized(hospitals: list[HospitalData], scale: float):
    d = hospitals[0].train_features.shape[1]
    total = sum(stats_vector(h.train_features) for h in hospitals)
    mean, std = normalization_from_stats(total, d)
    train = [normalize(h.train_features, mean, std, scale) for h in hospitals]
    test = [normalize(h.test_features, mean, std, scale) for h in hospitals]
    return train, test


def _test_accuracy(weights: np.ndarray, hospitals, test) -> float:
    correct = sum(
        accuracy(weights, x, h.test_labels) * len(x)
        for h, x in zip(hospitals, test, strict=True)
        if len(x)
    )
    return float(correct / sum(len(x) for x in test))


def plaintext_reference(
    hospitals: list[HospitalData],
    n_classes: int,
    schedule: HeadSchedule,
    slots: int,
    bucket: int,
    feature_scale: float,
) -> dict:
    train, test = normalized(hospitals, feature_scale)
    d = train[0].shape[1]
    layout = plan_layout(
        [n_buckets(len(x), bucket) for x in train],
        slots=slots,
        n_classes=n_classes,
        bucket=bucket,
        n_features=d,
    )
    x_blocks = [[np.zeros(slots) for _ in range(d + 1)] for _ in range(layout.n_blocks)]
    y_blocks = [np.zeros(slots) for _ in range(layout.n_blocks)]
    for i, (x, h) in enumerate(zip(train, hospitals, strict=True)):
        for block, (xb, yb) in pack_hospital(x, h.train_labels, n_classes, layout, i).items():
            for j in range(d + 1):
                x_blocks[block][j] += xb[j]
            y_blocks[block] += yb
    w = weights_matrix(
        train_head(PlainBackend(layout), x_blocks, y_blocks, layout, schedule), layout
    )
    n = sum(len(x) for x in train)
    # same effective step as the slot path, which averages gradients over padded positions
    exact = train_exact_logreg(
        np.vstack(train),
        np.concatenate([h.train_labels for h in hospitals]),
        n_classes,
        schedule.epochs,
        schedule.lr * n / layout.n_padded,
    )
    return {
        "plaintext_accuracy": _test_accuracy(w, hospitals, test),
        "exact_accuracy": _test_accuracy(exact, hospitals, test),
        "plaintext_weights": w,
        "n_padded": layout.n_padded,
    }
