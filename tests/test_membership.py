"""The membership inference attack: it catches an overfitted head and not a well-fitted one."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.experiments.membership import black_box_attack
from medfed.privacy.membership import loss_threshold_attack, sample_losses
from medfed.train.head import head_scores


def _fit(x: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=C, max_iter=5000).fit(x, y)
    return np.vstack([m.coef_.T, m.intercept_[None, :]])


def test_losses_are_the_cross_entropy():
    scores = np.array([[0.0], [2.0]])
    assert sample_losses(scores, np.array([1, 0])) == pytest.approx(
        [np.log(2), np.log1p(np.exp(2.0))]
    )
    multi = np.array([[1.0, 2.0, 3.0]])
    expected = -np.log(np.exp(3.0) / np.exp([1.0, 2.0, 3.0]).sum())
    assert sample_losses(multi, np.array([2])) == pytest.approx([expected])


def test_the_attack_catches_an_overfitted_head_and_not_a_regularized_one():
    rng = np.random.default_rng(0)
    d, n = 200, 100  # more features than samples, random labels: memorization
    x_in, x_out = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    y_in, y_out = rng.integers(0, 2, n), rng.integers(0, 2, n)
    overfit = _fit(x_in, y_in, C=100.0)
    hit = loss_threshold_attack(
        head_scores(overfit, x_in), y_in, head_scores(overfit, x_out), y_out
    )
    assert hit.auc > 0.75 and hit.tpr_at_1fpr > 0.01  # chance: 0.5 and 0.01
    # many samples per feature, a learnable task: members look like non-members
    d, n = 5, 4000
    x_in, x_out = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    w = rng.normal(size=d)
    noisy = lambda x: (x @ w + rng.normal(size=n) > 0).astype(int)  # noqa: E731
    y_in, y_out = noisy(x_in), noisy(x_out)
    fitted = _fit(x_in, y_in, C=1.0)
    miss = loss_threshold_attack(head_scores(fitted, x_in), y_in, head_scores(fitted, x_out), y_out)
    assert abs(miss.auc - 0.5) < 0.03
    assert miss.to_dict()["mia_members"] == n


def test_the_black_box_attack_learns_membership_from_an_overfitted_head_only():
    rng = np.random.default_rng(1)
    d, n = 200, 100
    x_in, x_out = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    y_in, y_out = rng.integers(0, 2, n), rng.integers(0, 2, n)
    overfit = _fit(x_in, y_in, C=100.0)
    hit = black_box_attack(head_scores(overfit, x_in), y_in, head_scores(overfit, x_out), y_out)
    assert hit["mia_blackbox_auc"] > 0.8 and hit["mia_blackbox_tpr_at_1fpr"] > 0.01
    again = black_box_attack(head_scores(overfit, x_in), y_in, head_scores(overfit, x_out), y_out)
    assert again == hit  # seeded
    d, n = 5, 4000
    x_in, x_out = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y_in, y_out = (x_in @ w > 0).astype(int), (x_out @ w > 0).astype(int)
    fitted = _fit(x_in, y_in, C=1.0)
    miss = black_box_attack(head_scores(fitted, x_in), y_in, head_scores(fitted, x_out), y_out)
    assert abs(miss["mia_blackbox_auc"] - 0.5) < 0.05
