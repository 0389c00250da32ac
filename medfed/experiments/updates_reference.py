"""Plaintext yardsticks for mode "updates", on the same split, seed and schedule.

``plaintext``: plain FedAvg in-process, with the federation's own arithmetic (global
normalization from the summed statistics, :func:`~medfed.train.local.train_local` from the
global head, sample-weighted averaging) and the same participants per round (dropouts
included), so ``accuracy - plaintext_accuracy`` isolates the encryption.

numpy only (no TenSEAL, torch or Flower).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfed.fl.workspace import HospitalData
from medfed.train.head import accuracy
from medfed.train.local import fedavg, head_shape, train_local
from medfed.train.normalization import shared_feature_map


def _test_accuracy(weights: np.ndarray, xs: Sequence[np.ndarray], ys: Sequence) -> float:
    total = sum(len(x) for x in xs)
    if not total:
        return float("nan")
    correct = sum(accuracy(weights, x, y) * len(x) for x, y in zip(xs, ys, strict=True) if len(x))
    return float(correct / total)


def fedavg_reference(
    hospitals: list[HospitalData],
    n_classes: int,
    rounds: int,
    local_epochs: int,
    lr: float,
    feature_scale: float = 1.0,
    components: int = 0,
    samples_per_component: int = 0,
    l2: float = 0.0,
    participants: Sequence[Sequence[int]] | None = None,
    stats_participants: Sequence[int] | None = None,
    evaluators: Sequence[int] | None = None,
) -> dict:
    """Plain FedAvg (indices into ``hospitals``).

    Args:
        participants: per round, the hospitals whose update entered the sum (default: all).
        stats_participants: the hospitals whose statistics set the normalization (default: all).
        evaluators: the hospitals whose test splits are scored (default: all).
    """
    everyone = list(range(len(hospitals)))
    participants = [list(p) for p in participants] if participants else [everyone] * rounds
    if len(participants) != rounds:
        raise ValueError(f"participants lists {len(participants)} rounds, expected {rounds}")
    stats_by = list(stats_participants) if stats_participants is not None else everyone
    evaluators = list(evaluators) if evaluators is not None else everyone
    fmap = shared_feature_map(
        [np.asarray(h.train_features) for h in hospitals],
        stats_by,
        components,
        feature_scale,
        samples_per_component,
    )
    train = [fmap(h.train_features) for h in hospitals]
    test = [fmap(h.test_features) for h in hospitals]

    w = np.zeros(head_shape(fmap.width, n_classes))
    for members in participants:
        heads = [
            train_local(w, train[i], hospitals[i].train_labels, n_classes, local_epochs, lr, l2)
            for i in members
        ]
        w = fedavg(heads, [len(train[i]) for i in members])
    xs = [test[i] for i in evaluators]
    ys = [hospitals[i].test_labels for i in evaluators]
    return {
        "plaintext_accuracy": _test_accuracy(w, xs, ys),
        "plaintext_weights": w,
        "plaintext_test": test,  # every hospital's test features under the same map
    }
