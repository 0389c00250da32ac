"""The released head's empirical privacy: membership-inference attacks from the harness's
plaintext view (each hospital's private ``eval.json``), never inside a protocol party.

Two attacks on the head's outputs: Yeom et al.'s loss threshold (``mia_*``, no training, the
baseline) and the adversarial-robustness-toolbox's black-box attack (``mia_blackbox_*``: a
random forest trained on the head's class probabilities and the labels of half the members
and half the non-members, scored on the other halves; a stronger attacker who holds a
labelled sample of both).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: metrics.json keys of the attacks (None where one could not run).
MEMBERSHIP_KEYS = (
    "mia_auc",
    "mia_tpr_at_1fpr",
    "mia_members",
    "mia_non_members",
    "mia_blackbox_auc",
    "mia_blackbox_tpr_at_1fpr",
)


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

    members, non_members = (
        pool(inside, "train_scores", "train_labels"),
        pool(outside, "scores", "labels"),
    )
    result = loss_threshold_attack(*members, *non_members)
    return result.to_dict() | black_box_attack(*members, *non_members)


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """The head's class probabilities: logistic for one head, softmax for several."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-np.clip(s[:, 0], -500, 500)))
        return np.stack([1 - p, p], axis=1)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def black_box_attack(
    member_scores: np.ndarray,
    member_labels: np.ndarray,
    non_member_scores: np.ndarray,
    non_member_labels: np.ndarray,
    seed: int = 0,
) -> dict[str, float | None]:
    """ART's ``MembershipInferenceBlackBox`` (random forest on the class probabilities and the
    label), trained on the first half of each set (seeded order), scored on the second.
    ``mia_blackbox_*`` are None when ART is not installed or a half would be empty."""
    try:
        from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
        from art.estimators.classification import SklearnClassifier
    except ImportError:  # the Python 3.10 threshold environment has no ART
        return {"mia_blackbox_auc": None, "mia_blackbox_tpr_at_1fpr": None}
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    sets = []
    for scores, labels in ((member_scores, member_labels), (non_member_scores, non_member_labels)):
        order = rng.permutation(len(labels))
        half = len(order) // 2
        p, y = _probabilities(scores)[order], np.asarray(labels)[order]
        sets.append(((p[:half], y[:half]), (p[half:], y[half:])))
    (m_fit, m_eval), (o_fit, o_eval) = sets
    if min(len(m_fit[1]), len(m_eval[1]), len(o_fit[1]), len(o_eval[1])) == 0:
        return {"mia_blackbox_auc": None, "mia_blackbox_tpr_at_1fpr": None}
    # ART wants an estimator for its shape checks; predictions are passed, never queried
    classes = m_fit[0].shape[1]
    grid = np.arange(classes, dtype=np.float64)[:, None]
    shape_only = SklearnClassifier(model=LogisticRegression().fit(grid, np.arange(classes)))
    blank = lambda k: np.zeros((k, 1))  # noqa: E731
    saved = np.random.get_state()  # ART's forest draws from numpy's global generator
    np.random.seed(seed)
    try:
        attack = MembershipInferenceBlackBox(shape_only, attack_model_type="rf")
        attack.fit(
            x=blank(len(m_fit[1])),
            y=m_fit[1],
            test_x=blank(len(o_fit[1])),
            test_y=o_fit[1],
            pred=m_fit[0],
            test_pred=o_fit[0],
        )
        guess = np.concatenate(
            [
                attack.infer(blank(len(y)), y, pred=p, probabilities=True).ravel()
                for p, y in (m_eval, o_eval)
            ]
        )
    finally:
        np.random.set_state(saved)
    truth = np.concatenate([np.ones(len(m_eval[1])), np.zeros(len(o_eval[1]))])
    fpr, tpr, _ = roc_curve(truth, guess)
    return {
        "mia_blackbox_auc": float(roc_auc_score(truth, guess)),
        "mia_blackbox_tpr_at_1fpr": float(np.interp(0.01, fpr, tpr)),
    }
