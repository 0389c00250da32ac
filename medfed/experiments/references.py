"""Plaintext yardsticks on the same split and seed.

``plaintext``: the encrypted path's exact arithmetic (same layout, padding, polynomial and
schedule) on numpy, so ``accuracy - plaintext_accuracy`` isolates encryption.
``exact``: logistic regression with the true sigmoid, same epochs and learning rate.
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import pack_diagonal, plan_diagonal
from medfed.crypto.packing import n_buckets
from medfed.fl.hospital import normalization_from_stats, normalize, stats_vector
from medfed.fl.workspace import HospitalData
from medfed.train.diagonal_head import (
    Block,
    DiagonalCompute,
    PlainDiagonalBackend,
    head_matrix,
    train_diagonal,
)
from medfed.train.head import HeadSchedule, accuracy
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
    """The encrypted path's own training code on numpy, and exact logistic regression."""
    train, test = normalized(hospitals, feature_scale)
    d = train[0].shape[1]
    layout = plan_diagonal(
        [n_buckets(len(x), bucket) for x in train],
        slots=slots,
        n_classes=n_classes,
        bucket=bucket,
        n_features=d,
    )
    sums: dict[int, list] = {}
    for i, (x, h) in enumerate(zip(train, hospitals, strict=True)):
        for block, b in pack_diagonal(x, h.train_labels, layout, i).items():
            if block in sums:
                sums[block][0] += b.diagonals
                sums[block][1] += b.mask
                sums[block][2] += b.targets
            else:
                sums[block] = [b.diagonals.copy(), b.mask.copy(), b.targets.copy()]
    compute = DiagonalCompute(PlainDiagonalBackend(layout), layout)
    compute.blocks = [
        Block(
            [[list(dg[g, a]) for a in range(layout.giant)] for g in range(layout.n_groups)],
            mask,
            list(targets),
        )
        for _, (dg, mask, targets) in sorted(sums.items())
    ]
    w, b = train_diagonal(PlainDiagonalBackend(layout), [compute], layout, schedule)
    head = head_matrix(w, b, layout)
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
        "plaintext_accuracy": _test_accuracy(head, hospitals, test),
        "exact_accuracy": _test_accuracy(exact, hospitals, test),
        "plaintext_weights": head,
        "n_padded": layout.n_padded,
    }
