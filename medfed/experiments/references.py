"""Plaintext yardsticks on the same split and seed.

``plaintext``: the encrypted path's exact arithmetic (same layout, padding, polynomial and
schedule) on numpy, so ``accuracy - plaintext_accuracy`` isolates encryption. It also computes
the very values the encrypted run masks in its refresh rounds, so it measures their hiding.
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import pack_diagonal, plan_diagonal, sum_packed
from medfed.crypto.packing import n_buckets
from medfed.fl.workspace import HospitalData
from medfed.privacy.mechanisms import unit_rows
from medfed.train.diagonal.backend import blocks_from_packed
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.epoch import head_matrix, train_diagonal
from medfed.train.diagonal.plain import PlainDiagonalBackend
from medfed.train.head import HeadSchedule, accuracy
from medfed.train.normalization import mapped_features, public_width, shared_feature_map


def normalized(
    hospitals: list[HospitalData],
    scale: float,
    over: list[int] | None = None,
    components: int = 0,
    clip: float | None = None,
):
    """Every hospital's features under the shared feature map, with statistics summed over
    ``over`` (default: all hospitals), as the hospitals that passed ``stats`` do in the
    federation. With ``clip`` (differential privacy), as the hospitals prepare them then: unit
    norm embeddings, mapped rows clipped to ``clip`` (the statistics without their noise)."""
    over = range(len(hospitals)) if over is None else over

    def raw(x):
        return unit_rows(x) if clip else x

    fmap = shared_feature_map(
        [raw(h.train_features) for h in hospitals], list(over), components, scale
    )

    def mapped(x):
        return mapped_features(x, fmap, unit=bool(clip), clip=clip or None)

    train = [mapped(h.train_features) for h in hospitals]
    test = [mapped(h.test_features) for h in hospitals]
    return train, test


def _test_accuracy(weights: np.ndarray, hospitals, test, on: list[int] | None = None) -> float:
    on = range(len(hospitals)) if on is None else on
    correct = sum(
        accuracy(weights, test[i], hospitals[i].test_labels) * len(test[i])
        for i in on
        if len(test[i])
    )
    total = sum(len(test[i]) for i in on)
    return float(correct / total) if total else float("nan")


def plaintext_reference(
    hospitals: list[HospitalData],
    n_classes: int,
    schedule: HeadSchedule,
    slots: int,
    bucket: int,
    feature_scale: float,
    *,
    components: int = 0,
    samples_per_component: int = 0,
    normalized_over: list[int] | None = None,
    trained_on: list[int] | None = None,
    evaluated_on: list[int] | None = None,
    dp_clip: float | None = None,
) -> dict:
    """The encrypted path's own training code on numpy (with ``dp_clip``: the DP run's feature
    preparation, without its noise).

    When the aggregator excluded hospitals, pass the indices it kept: ``normalized_over``
    (passed ``stats``: their statistics and slot allocations count), ``trained_on`` (passed
    ``upload``: their samples are trained on) and ``evaluated_on`` (evaluated the head), so
    that ``accuracy - plaintext_accuracy`` still measures encryption alone.

    Returns ``plaintext_accuracy``, ``plaintext_weights`` (the head), ``plaintext_test`` (the
    mapped test features), ``n_padded`` and ``refreshes``: per round, the vectors the encrypted
    run masks and the sum of their ``|v|`` per kind (see
    :func:`~medfed.crypto.masking.refresh_security`).
    """
    everyone = list(range(len(hospitals)))
    stats_in = everyone if normalized_over is None else sorted(normalized_over)
    train_in = stats_in if trained_on is None else sorted(trained_on)
    if not set(train_in) <= set(stats_in) or not train_in:
        raise ValueError("trained_on must be a non-empty subset of normalized_over")
    buckets = [n_buckets(len(hospitals[i].train_features), bucket) for i in stats_in]
    d = hospitals[0].train_features.shape[1]
    width = public_width(d, components, bucket * sum(buckets), samples_per_component)
    train, test = normalized(hospitals, feature_scale, stats_in, components and width, dp_clip)
    layout = plan_diagonal(
        buckets,
        slots=slots,
        n_classes=n_classes,
        bucket=bucket,
        n_features=train[0].shape[1],
    )
    packed = sum_packed(  # a hospital that failed upload leaves its allocation empty
        pack_diagonal(train[i], hospitals[i].train_labels, layout, stats_in.index(i))
        for i in train_in
    )
    backend = PlainDiagonalBackend(layout)
    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks_from_packed(packed, layout)
    w, b = train_diagonal(backend, [compute], layout, schedule)
    head = head_matrix(w, b, layout)
    return {
        "plaintext_accuracy": _test_accuracy(head, hospitals, test, evaluated_on),
        "plaintext_weights": head,
        "plaintext_test": test,  # every hospital's test features under the same map
        "n_padded": layout.n_padded,
        # per round, the |v| the encrypted run masks (medfed.crypto.masking.refresh_security)
        "refreshes": backend.records,
    }
