"""The released head's empirical privacy: a membership-inference attack from the harness's
plaintext view (each hospital's private ``eval.json``), never inside a protocol party."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: metrics.json keys of the attack (None where it could not run).
MEMBERSHIP_KEYS = ("mia_auc", "mia_tpr_at_1fpr", "mia_members", "mia_non_members")


def membership_metrics(evaluations: Sequence[dict[str, Any]], members: Iterable[str]) -> dict:
    """Yeom et al.'s loss-threshold attack on the head the hospitals decrypted: the train
    samples of the hospitals in ``members`` (those the federation trained on) against the test
    samples of every evaluator. Every key is None when either set is empty."""
    from medfed.privacy.membership import loss_threshold_attack

    trained = set(members)
    inside = [e for e in evaluations if e["hospital"] in trained and e.get("train_scores")]
    outside = [e for e in evaluations if e.get("scores")]
    if not inside or not outside:
        return dict.fromkeys(MEMBERSHIP_KEYS)

    def pool(items: list[dict], scores: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
        s = np.vstack([np.asarray(e[scores], dtype=np.float64) for e in items])
        y = np.concatenate([np.asarray(e[labels], dtype=np.int64) for e in items])
        return s, y

    result = loss_threshold_attack(
        *pool(inside, "train_scores", "train_labels"), *pool(outside, "scores", "labels")
    )
    return result.to_dict()
