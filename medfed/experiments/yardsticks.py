"""Honest yardsticks for a trained head: a tuned plaintext model, the majority class, AUC.

``plaintext_accuracy`` (the same weak schedule on plaintext) isolates the CKKS approximation
but says nothing about whether the schedule learned anything. These numbers do:

* :func:`tuned_reference`: StandardScaler + ``LogisticRegressionCV`` (C picked by 5-fold
  stratified CV over 13 values in 1e-4..1e2, multinomial for several classes) fitted on the
  pooled plaintext train embeddings of the hospitals the federation trained on, and scored on
  the same test samples as the encrypted head (``reference_accuracy``, ``reference_auc``).
* :func:`majority_accuracy`: always predict the most frequent train label.
* :func:`encryption_cost_pp`: ``100 * (reference_accuracy - accuracy)``, the headline.
* :func:`head_auc`: ROC AUC of a head's scores. Binary: the single head's score. Several
  classes: macro one-vs-rest AUC on the softmax of the per-class scores (as MedMNIST's
  evaluator and ``roc_auc_score(..., multi_class="ovr", average="macro")`` compute it).

numpy and scikit-learn only; scikit-learn is imported inside the functions that need it, so
importing this module costs
nothing in an environment without it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from medfed.train.head import head_scores  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from medfed.fl.workspace import HospitalData

#: Warnings of the reference fit that need no action: a class with fewer than 3 train samples
#: (the CV still runs), and sklearn >= 1.8 announcing defaults that keep this model's
#: behaviour (l1_ratios (0,) is the plain L2 penalty; the legacy fitted attributes).
_QUIET = (
    "The least populated class",
    "The default value for l1_ratios",
    "The fitted attributes of LogisticRegressionCV",
)

#: The C grid of the tuned reference: 13 values, 1e-4 .. 1e2 (on standardized features a C
#: above 100 is practically unregularized, and lbfgs then runs to its iteration limit).
REFERENCE_CS = np.logspace(-4, 2, 13)
#: Cross-validation folds and the solver's iteration limit of the tuned reference.
REFERENCE_FOLDS = 5
REFERENCE_MAX_ITER = 1000


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = np.asarray(scores, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def head_auc(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """ROC AUC of a head's scores on ``labels`` (NaN where undefined).

    Binary (``n_classes == 2``): AUC of the single score column (class 1 is positive).
    Several classes: macro one-vs-rest AUC of the softmax of the scores, i.e. sklearn's
    ``roc_auc_score(labels, softmax(scores), multi_class="ovr", average="macro")``. When some
    class has no test sample its one-vs-rest AUC is undefined: the macro mean then runs over
    the classes present (NaN if fewer than two are).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if len(y) != len(s):
        raise ValueError(f"{len(s)} score rows for {len(y)} labels")
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, s[:, -1]))
    if s.shape[1] != n_classes:
        raise ValueError(f"{s.shape[1]} score columns for {n_classes} classes")
    p = softmax(s)
    if len(present) == n_classes:
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


def majority_class(train_y: np.ndarray) -> int:
    """The most frequent train label (the smallest one on a tie)."""
    return int(np.argmax(np.bincount(np.asarray(train_y).reshape(-1).astype(np.int64))))


def majority_accuracy(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of always predicting the most frequent train label (NaN: no test sample)."""
    test = np.asarray(test_y).reshape(-1)
    if not len(test):
        return float("nan")
    return float(np.mean(test == majority_class(train_y)))


def encryption_cost_pp(reference_accuracy: float, accuracy: float) -> float:
    """``100 * (reference_accuracy - accuracy)``: positive when the encrypted head is worse."""
    return 100.0 * (float(reference_accuracy) - float(accuracy))


def tuned_reference(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    seed: int,
) -> dict:
    """A tuned plaintext logistic regression: ``reference_accuracy``, ``_auc`` and ``_C``.

    StandardScaler, then ``LogisticRegressionCV(Cs=REFERENCE_CS,
    cv=StratifiedKFold(REFERENCE_FOLDS, shuffle=True, random_state=seed),
    max_iter=REFERENCE_MAX_ITER)`` (lbfgs: multinomial for several classes), fitted on
    ``train_*`` only (rows in a canonical order, so the folds do not depend on how the data
    were partitioned) and scored on ``test_*``. BLAS runs on one thread: on two cores its
    threads made the small fits up to 100x slower.
    Train data with a single class give that class as the prediction (C None, AUC NaN).
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr = np.asarray(train_x, dtype=np.float64)
    ytr = np.asarray(train_y).reshape(-1).astype(np.int64)
    xte = np.asarray(test_x, dtype=np.float64).reshape(-1, xtr.shape[1])
    yte = np.asarray(test_y).reshape(-1).astype(np.int64)
    # a canonical row order: the CV folds (and so the chosen C) depend on the pooled data only,
    # not on how the hospitals partitioned it (iid and Dirichlet runs get the same reference)
    order = np.lexsort(np.column_stack([xtr, ytr]).T)
    xtr, ytr = xtr[order], ytr[order]
    if len(np.unique(ytr)) < 2:
        return {
            "reference_accuracy": majority_accuracy(ytr, yte),
            "reference_auc": float("nan"),
            "reference_C": None,
        }
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=REFERENCE_CS,
            cv=StratifiedKFold(REFERENCE_FOLDS, shuffle=True, random_state=seed),
            max_iter=REFERENCE_MAX_ITER,
            scoring="accuracy",  # the default up to sklearn 1.10, named so it stays
        ),
    )
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1):
        for quiet in _QUIET:
            warnings.filterwarnings("ignore", message=quiet)
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        model.fit(xtr, ytr)
    clf = model[-1]
    if not len(yte):
        acc, auc = float("nan"), float("nan")
    else:
        proba = np.zeros((len(yte), n_classes))
        proba[:, clf.classes_] = model.predict_proba(xte)  # a class absent from train: 0
        acc = float(np.mean(model.predict(xte) == yte))
        if n_classes == 2:
            auc = head_auc(proba[:, 1], yte, 2)
        else:
            auc = head_auc(np.log(np.clip(proba, 1e-300, None)), yte, n_classes)
    return {
        "reference_accuracy": acc,
        "reference_auc": auc,
        "reference_C": float(np.ravel(clf.C_)[0]),
    }


#: The keys :func:`yardstick_metrics` adds to every result, in order.
YARDSTICK_KEYS = (
    "accuracy",
    "auc",
    "reference_accuracy",
    "reference_auc",
    "reference_C",
    "majority_accuracy",
    "encryption_cost_pp",
    "plaintext_accuracy",
    "plaintext_auc",
    "accuracy_gap_pp",
    "approximation_gap_pp",
)


def yardstick_metrics(
    *,
    accuracy: float,
    scores: np.ndarray,
    score_labels: np.ndarray,
    plaintext_accuracy: float,
    plaintext_scores: np.ndarray,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    seed: int,
) -> dict:
    """The accuracy block of metrics.json, in order: ``accuracy``, ``auc``, the tuned
    reference, ``majority_accuracy``, ``encryption_cost_pp``, the same-schedule plaintext run
    (``plaintext_accuracy``, ``plaintext_auc``) and its gap (``accuracy_gap_pp`` and its
    alias ``approximation_gap_pp``).

    ``scores``/``score_labels``: the encrypted head's pooled test scores (as the hospitals
    evaluated it); ``plaintext_scores``: the same-schedule plaintext head's scores on the same
    samples; ``train_*``: the pooled raw train embeddings of the hospitals the federation
    trained on; ``test_*``: the raw test embeddings of the hospitals that evaluated the head.
    """
    ref = tuned_reference(train_x, train_y, test_x, test_y, n_classes, seed)
    gap = 100.0 * (accuracy - plaintext_accuracy)
    return {
        "accuracy": float(accuracy),
        "auc": head_auc(scores, score_labels, n_classes) if len(score_labels) else math.nan,
        **ref,
        "majority_accuracy": majority_accuracy(train_y, test_y),
        "encryption_cost_pp": encryption_cost_pp(ref["reference_accuracy"], accuracy),
        "plaintext_accuracy": float(plaintext_accuracy),
        "plaintext_auc": head_auc(plaintext_scores, test_y, n_classes) if len(test_y) else math.nan,
        "accuracy_gap_pp": gap,
        "approximation_gap_pp": gap,
    }


def pooled_scores(evaluations: list[dict], heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the ``scores`` ``(n, heads)`` and ``labels`` of hospitals' evaluations
    (the dicts :func:`medfed.fl.workspace.read_evaluations` returns), in the given order."""
    scores = [np.asarray(e["scores"], dtype=np.float64).reshape(-1, heads) for e in evaluations]
    labels = [np.asarray(e["labels"], dtype=np.int64).reshape(-1) for e in evaluations]
    return (
        np.vstack(scores) if scores else np.zeros((0, heads)),
        np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
    )


def federation_yardsticks(
    hospitals: Sequence[HospitalData],
    evaluations: list[dict],
    *,
    trained_on: Sequence[int],
    accuracy: float,
    plaintext_accuracy: float,
    plaintext_weights: np.ndarray,
    plaintext_test: Sequence[np.ndarray],
    n_classes: int,
    seed: int,
) -> dict:
    """:func:`yardstick_metrics` of one simulated federation, on the federation's own split.

    Args:
        hospitals: every hospital's raw data (the simulator plays every party, so it can pool).
        evaluations: the evaluations behind ``accuracy`` (``eval.json`` dicts), in order.
        trained_on: indices of the hospitals whose train data the federation used.
        plaintext_test: every hospital's test features as the same-schedule plaintext run
            normalized them (``plaintext_weights`` is scored on the evaluators' ones).
    """
    index = {h.name: i for i, h in enumerate(hospitals)}
    on = [index[e["hospital"]] for e in evaluations]
    heads = np.asarray(plaintext_weights).shape[1]
    scores, labels = pooled_scores(evaluations, heads)
    d = hospitals[0].train_features.shape[1]
    width = np.asarray(plaintext_weights).shape[0] - 1  # features the head was trained on

    def stack(arrays: list[np.ndarray], width: int = d) -> np.ndarray:
        return np.vstack([np.asarray(a, dtype=np.float64).reshape(-1, width) for a in arrays])

    def join(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(a).reshape(-1) for a in arrays] + [np.zeros(0, int)])

    test_x = stack([hospitals[i].test_features for i in on] + [np.zeros((0, d))])
    return yardstick_metrics(
        accuracy=accuracy,
        scores=scores,
        score_labels=labels,
        plaintext_accuracy=plaintext_accuracy,
        plaintext_scores=head_scores(
            plaintext_weights,
            stack([plaintext_test[i] for i in on] + [np.zeros((0, width))], width),
        ),
        train_x=stack([hospitals[i].train_features for i in trained_on]),
        train_y=join([hospitals[i].train_labels for i in trained_on]),
        test_x=test_x,
        test_y=join([hospitals[i].test_labels for i in on]),
        n_classes=n_classes,
        seed=seed,
    )
