"""The yardsticks of every result: tuned plaintext reference, majority class, AUC, costs.

numpy and scikit-learn only (no Flower, Ray or TenSEAL in these tests).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medfed.experiments.yardsticks import (
    encryption_cost_pp,
    federation_yardsticks,
    head_auc,
    head_scores,
    majority_accuracy,
    pooled_scores,
    softmax,
    tuned_reference,
    yardstick_metrics,
)
from medfed.fl.workspace import HospitalData, hospital_dir, read_evaluations, write_evaluation
from medfed.train.head import accuracy, predict


def _blobs(n: int, d: int, n_classes: int, seed: int, flip: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.normal(size=(n, d)) * 3.0 + 5.0
    x[:, :n_classes] += 5.0 * np.eye(n_classes)[y]
    if flip:  # a hospital whose labels contradict everyone else's
        y = (n_classes - 1) - y
    return x, y.astype(np.int64)


def _hospitals(n_classes: int) -> list[HospitalData]:
    out = []
    for i in range(3):
        xtr, ytr = _blobs(90, 6, n_classes, seed=10 + i, flip=(i == 2))
        xte, yte = _blobs(40 + 10 * i, 6, n_classes, seed=20 + i)
        out.append(HospitalData(f"hospital-{i}", xtr, ytr, xte, yte))
    return out


def _evaluate(workspace, index: int, name: str, w, x, y) -> None:
    hospital_dir(workspace, index).mkdir(parents=True, exist_ok=True)
    write_evaluation(workspace, index, name, w, x, y)


def _direct(train_x, train_y, test_x, test_y, seed):
    """The reference as the issue specifies it, fitted here directly with sklearn."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=np.logspace(-4, 2, 13),
            cv=StratifiedKFold(5, shuffle=True, random_state=seed),
            max_iter=1000,
            scoring="accuracy",
        ),
    )
    order = np.lexsort(np.column_stack([train_x, train_y]).T)  # the reference's row order
    model.fit(np.asarray(train_x)[order], np.asarray(train_y)[order])
    return float(np.mean(model.predict(test_x) == test_y)), float(np.ravel(model[-1].C_)[0])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("n_classes", [2, 3])
def test_reference_is_a_direct_sklearn_fit_on_the_pooled_contributors_only(tmp_path, n_classes):
    hospitals = _hospitals(n_classes)
    # hospitals 0 and 1 trained, 0 and 2 evaluated (hospital 2's flipped train data left out)
    for i in (0, 2):
        w = np.random.default_rng(i).normal(size=(7, 1 if n_classes == 2 else n_classes))
        _evaluate(
            tmp_path, i, hospitals[i].name, w, hospitals[i].test_features, hospitals[i].test_labels
        )
    evals = [e for e in read_evaluations(tmp_path, 3) if e is not None]
    assert [e["hospital"] for e in evals] == ["hospital-0", "hospital-2"]
    heads = 1 if n_classes == 2 else n_classes
    pw = np.random.default_rng(9).normal(size=(7, heads))
    plain_test = [h.test_features / 2 for h in hospitals]
    got = federation_yardsticks(
        hospitals,
        evals,
        trained_on=[0, 1],
        accuracy=0.5,
        plaintext_accuracy=0.25,
        plaintext_weights=pw,
        plaintext_test=plain_test,
        n_classes=n_classes,
        seed=4,
    )
    tx = np.vstack([hospitals[i].train_features for i in (0, 1)])
    ty = np.concatenate([hospitals[i].train_labels for i in (0, 1)])
    ex = np.vstack([hospitals[i].test_features for i in (0, 2)])
    ey = np.concatenate([hospitals[i].test_labels for i in (0, 2)])
    acc, c = _direct(tx, ty, ex, ey, 4)
    assert got["reference_accuracy"] == acc and got["reference_C"] == c
    assert acc > 0.6  # the contributors' data are learnable
    # every train hospital (the flipped one included) gives a different, worse number
    all_x = np.vstack([h.train_features for h in hospitals])
    all_y = np.concatenate([h.train_labels for h in hospitals])
    assert _direct(all_x, all_y, ex, ey, 4)[0] < acc - 0.05
    assert got["majority_accuracy"] == majority_accuracy(ty, ey)
    # the head's AUC uses the hospitals' own scores; the plaintext AUC the normalized features
    scores = np.vstack(
        [
            head_scores(np.array(e["weights"]), hospitals[i].test_features)
            for i, e in zip((0, 2), evals, strict=True)
        ]
    )
    assert got["auc"] == pytest.approx(head_auc(scores, ey, n_classes))
    plain = head_scores(pw, np.vstack([plain_test[i] for i in (0, 2)]))
    assert got["plaintext_auc"] == pytest.approx(head_auc(plain, ey, n_classes))
    assert got["encryption_cost_pp"] == pytest.approx(100 * (acc - 0.5))
    assert got["approximation_gap_pp"] == got["accuracy_gap_pp"] == pytest.approx(25.0)
    assert list(got)[:2] == ["accuracy", "auc"] and "exact_accuracy" not in got


def test_majority_accuracy_predicts_the_most_frequent_train_label():
    assert majority_accuracy([0, 0, 1], [0, 1, 1, 1]) == 0.25
    assert majority_accuracy([2, 2, 1, 0], [2, 2, 0]) == pytest.approx(2 / 3)
    assert majority_accuracy([1, 0], [0, 0, 1]) == pytest.approx(2 / 3)  # tie: smallest label
    assert math.isnan(majority_accuracy([1], []))


def test_binary_auc_is_sklearns_on_the_single_score():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=(200, 1)) + y[:, None]
    assert head_auc(s, y, 2) == pytest.approx(roc_auc_score(y, s[:, 0]))
    assert head_auc(s[:, 0], y, 2) == head_auc(s, y, 2)
    assert head_auc(np.array([[0.1], [0.4], [0.35], [0.8]]), [0, 0, 1, 1], 2) == 0.75
    assert math.isnan(head_auc(s[:5], np.zeros(5, int), 2))  # one class: undefined


def test_multiclass_auc_is_macro_one_vs_rest_on_the_softmax():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    s = rng.normal(size=(300, 4)) + 1.2 * np.eye(4)[y]
    p = softmax(s)
    assert np.allclose(p.sum(axis=1), 1.0)
    want = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert head_auc(s, y, 4) == pytest.approx(want)
    assert 0.7 < want < 1.0
    # a class absent from the test labels: the macro mean runs over the classes present
    keep = y != 3
    per_class = [roc_auc_score(y[keep] == k, p[keep, k]) for k in range(3)]
    assert head_auc(s[keep], y[keep], 4) == pytest.approx(np.mean(per_class))


def test_head_scores_are_what_predict_decides_on():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 5))
    for heads in (1, 3):
        w = rng.normal(size=(6, heads))
        s = head_scores(w, x)
        assert s.shape == (50, heads)
        decided = (s[:, 0] > 0).astype(int) if heads == 1 else np.argmax(s, axis=1)
        assert np.array_equal(decided, predict(w, x))


def test_encryption_cost_is_positive_when_the_encrypted_head_is_worse():
    assert encryption_cost_pp(0.9, 0.8) == pytest.approx(10.0)
    assert encryption_cost_pp(0.8, 0.9) == pytest.approx(-10.0)
    x, y = _blobs(120, 4, 2, seed=3)
    common = {
        "scores": np.zeros((60, 1)),
        "score_labels": y[60:],
        "plaintext_accuracy": 0.5,
        "plaintext_scores": np.zeros((60, 1)),
        "train_x": x[:60],
        "train_y": y[:60],
        "test_x": x[60:],
        "test_y": y[60:],
        "n_classes": 2,
        "seed": 0,
    }
    worse = yardstick_metrics(accuracy=0.0, **common)
    assert worse["encryption_cost_pp"] == pytest.approx(100 * worse["reference_accuracy"])
    assert worse["encryption_cost_pp"] > 0
    better = yardstick_metrics(accuracy=1.0, **common)
    assert better["encryption_cost_pp"] < 0


def test_reference_survives_a_single_class_and_classes_missing_from_train():
    x, y = _blobs(90, 4, 3, seed=5)
    only = tuned_reference(x, np.ones(90, int), x, y, 3, 0)
    assert only["reference_accuracy"] == np.mean(y == 1) and only["reference_C"] is None
    assert math.isnan(only["reference_auc"])
    y2 = np.where(y == 2, 1, y)  # class 2 never seen in train, present in test
    got = tuned_reference(x, y2, x, y, 3, 0)
    assert 0 < got["reference_accuracy"] < 1 and 0.5 < got["reference_auc"] <= 1


def test_evaluations_keep_per_sample_scores_and_labels(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 3))
    x, y = rng.normal(size=(7, 4)), rng.integers(0, 3, 7)
    _evaluate(tmp_path, 1, "hospital-1", w, x, y)
    _evaluate(tmp_path, 0, "hospital-0", w, np.zeros((0, 4)), np.zeros(0, int))
    e0, e1 = read_evaluations(tmp_path, 2)
    assert e1["correct"] == round(accuracy(w, x, y) * 7) and e1["labels"] == y.tolist()
    np.testing.assert_array_equal(np.array(e1["scores"]), head_scores(w, x))  # JSON round-trips
    scores, labels = pooled_scores([e0, e1], 3)
    assert scores.shape == (7, 3) and np.array_equal(labels, y)
