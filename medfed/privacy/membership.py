"""Membership inference against a released head: did this sample train it?

:func:`loss_threshold_attack` is Yeom et al.'s attack (CSF 2018): a sample whose loss under
the head is low is guessed a member. Its ROC curve over members (the training samples) and
non-members (held-out samples of the same distribution) gives the AUC (0.5: the head tells
nothing) and the true-positive rate at 1 % false positives (Carlini et al., S&P 2022: what an
attack achieves when it must rarely be wrong). It needs only the head's scores and the labels,
which the simulation harness has; it never runs inside a protocol party.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def sample_losses(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy per sample of a head's raw ``scores`` ``(n, heads)``: binary heads (one
    column) through the logistic function, several heads through the softmax."""
    s = np.asarray(scores, dtype=np.float64).reshape(len(labels), -1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if s.shape[1] == 1:
        z = s[:, 0]
        return -np.where(y == 1, _log_sigmoid(z), _log_sigmoid(-z))
    log_softmax = s - np.logaddexp.reduce(s, axis=1, keepdims=True)
    return -log_softmax[np.arange(len(y)), y]


@dataclass(frozen=True)
class AttackResult:
    """How well the attack tells members from non-members."""

    auc: float
    tpr_at_1fpr: float
    members: int
    non_members: int

    def to_dict(self) -> dict[str, float | int]:
        """The metrics.json keys."""
        return {
            "mia_auc": self.auc,
            "mia_tpr_at_1fpr": self.tpr_at_1fpr,
            "mia_members": self.members,
            "mia_non_members": self.non_members,
        }


def loss_threshold_attack(
    member_scores: np.ndarray,
    member_labels: np.ndarray,
    non_member_scores: np.ndarray,
    non_member_labels: np.ndarray,
) -> AttackResult:
    """Yeom et al.'s loss-threshold attack on a head, from its scores on both sets."""
    from sklearn.metrics import roc_auc_score, roc_curve

    member_loss = sample_losses(member_scores, member_labels)
    other_loss = sample_losses(non_member_scores, non_member_labels)
    if not len(member_loss) or not len(other_loss):
        raise ValueError("the attack needs at least one member and one non-member")
    truth = np.concatenate([np.ones(len(member_loss)), np.zeros(len(other_loss))])
    guess = -np.concatenate([member_loss, other_loss])  # lower loss: more likely a member
    fpr, tpr, _ = roc_curve(truth, guess)
    return AttackResult(
        auc=float(roc_auc_score(truth, guess)),
        tpr_at_1fpr=float(np.interp(0.01, fpr, tpr)),
        members=len(member_loss),
        non_members=len(other_loss),
    )
