"""One run's result: :class:`RunResult`, typed core fields over the full metrics mapping.

Every mode returns one (:func:`medfed.run`, :func:`medfed.federate`). This module imports
nothing from medfed, so every layer can read a result.

``result.to_dict()`` is exactly what ``metrics.json`` holds (NaN/Inf as null, tuples as
lists); ``result["accuracy"]``, ``"auc" in result``, ``result.get(...)`` and ``set(result)``
read the run's metrics as they were computed (NaN stays NaN), as from a dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` as metrics.json stores it: NaN/Inf become None, tuples lists (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def metrics_json(metrics: Mapping[str, Any]) -> str:
    """The text of ``metrics.json`` for ``metrics`` (standard JSON, indented, newline-ended)."""
    return json.dumps(jsonable(metrics), indent=2) + "\n"


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _count(metrics: Mapping[str, Any], key: str) -> int | None:
    value = metrics.get(key)
    return None if value is None else int(value)


@dataclass(frozen=True, eq=False)
class RunResult(Mapping[str, Any]):
    """What one federation run measured (any mode); build one with :meth:`from_metrics`.

    The typed fields are the numbers every mode reports; ``metrics`` holds everything (the
    mode's own keys too, read-only). Indexing, iteration and ``len`` go to ``metrics``. A
    typed field is None where the run did not report it.

    Attributes:
        mode, key_setup, hospitals: the run's mode, key setup (``metrics["keys"]``) and
            number of hospitals.
        n_classes, dataset, backbone: the task and what the features came from.
        accuracy, auc: the federated head, on the test samples of the hospitals that evaluated.
        reference_accuracy, reference_auc: a tuned plaintext logistic regression on the pooled
            training data, the yardstick.
        majority_accuracy: always predicting the majority class.
        encryption_cost_pp: ``100 * (reference_accuracy - accuracy)``, the headline.
        plaintext_accuracy, plaintext_auc: the same schedule run on plaintext.
        approximation_gap_pp: ``100 * (accuracy - plaintext_accuracy)``.
        test_samples_evaluated: test samples behind ``accuracy``.
        wall_seconds, federation_seconds: the whole run; the federation alone.
        bytes_up, bytes_down: hospitals to aggregator, and back, in total.
        excluded: the hospitals left out of a stage, each with the stage and the reason.
        metrics: every metric, as computed (NaN stays NaN).
    """

    mode: str
    key_setup: str  # metrics["keys"] (``keys()`` is the Mapping's, as for a dict)
    hospitals: int
    n_classes: int | None
    dataset: str | None
    backbone: str | None
    accuracy: float | None  # the federated head, on the evaluators' test samples
    auc: float | None
    reference_accuracy: float | None  # tuned plaintext logistic regression, pooled data
    reference_auc: float | None
    majority_accuracy: float | None
    encryption_cost_pp: float | None  # 100 * (reference_accuracy - accuracy), the headline
    plaintext_accuracy: float | None  # the same schedule on plaintext
    plaintext_auc: float | None
    approximation_gap_pp: float | None  # 100 * (accuracy - plaintext_accuracy)
    test_samples_evaluated: int | None
    wall_seconds: float | None
    federation_seconds: float | None
    bytes_up: int | None
    bytes_down: int | None
    excluded: tuple[Mapping[str, Any], ...]
    metrics: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> RunResult:
        """The result of a run whose metrics are ``metrics`` (a RunResult is returned as is)."""
        if isinstance(metrics, RunResult):
            return metrics
        m = MappingProxyType(dict(metrics))
        return cls(
            mode=str(m.get("mode", "")),
            key_setup=str(m.get("keys", "")),
            hospitals=int(m.get("hospitals", 0)),
            n_classes=_count(m, "n_classes"),
            dataset=m.get("dataset"),
            backbone=m.get("backbone"),
            accuracy=_number(m, "accuracy"),
            auc=_number(m, "auc"),
            reference_accuracy=_number(m, "reference_accuracy"),
            reference_auc=_number(m, "reference_auc"),
            majority_accuracy=_number(m, "majority_accuracy"),
            encryption_cost_pp=_number(m, "encryption_cost_pp"),
            plaintext_accuracy=_number(m, "plaintext_accuracy"),
            plaintext_auc=_number(m, "plaintext_auc"),
            approximation_gap_pp=_number(m, "approximation_gap_pp"),
            test_samples_evaluated=_count(m, "test_samples_evaluated"),
            wall_seconds=_number(m, "wall_seconds"),
            federation_seconds=_number(m, "federation_seconds"),
            bytes_up=_count(m, "bytes_up"),
            bytes_down=_count(m, "bytes_down"),
            excluded=tuple(m.get("excluded") or ()),
            metrics=m,
        )

    def to_dict(self) -> dict[str, Any]:
        """The metrics exactly as ``metrics.json`` holds them (a fresh, JSON-ready dict)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """The text of this run's ``metrics.json``."""
        return metrics_json(self.metrics)

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RunResult):
            other = other.metrics
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.metrics) == dict(other)

    __hash__ = None  # type: ignore[assignment] - equal to a dict, so unhashable like one

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:  # pickles (sweep workers)
        return (RunResult.from_metrics, (dict(self.metrics),))
