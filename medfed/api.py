"""The library entry points: one run from a config, or a federation of your own hospitals.

Both work for every mode and key setup of :class:`~medfed.config.SimulationConfig` and return
the run's metrics (the dict written to ``metrics.json``)::

    import medfed

    metrics = medfed.run(medfed.SimulationConfig(hospitals=3, epochs=5))
    print(metrics["accuracy"], metrics["reference_accuracy"], metrics["encryption_cost_pp"])
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from medfed.config import ConfigError, SimulationConfig

if TYPE_CHECKING:
    from medfed.fl.workspace import HospitalData


def run(config: SimulationConfig | None = None, **overrides: Any) -> dict:
    """Load and embed the dataset, partition it over the hospitals and run the federation.

    Args:
        config: the run (default: the built-in default, BreastMNIST over 5 hospitals).
        overrides: any :class:`SimulationConfig` field, e.g. ``hospitals=3, epochs=5``.

    Returns:
        The metrics (``accuracy``, ``auc``, ``reference_accuracy``, ``majority_accuracy``,
        ``encryption_cost_pp``, ``plaintext_accuracy``, wall time, bytes per party, ...); with
        ``config.out`` set they are also written to ``OUT/metrics.json``.
    """
    from medfed.runner import run as run_config

    cfg = config if config is not None else SimulationConfig()
    return run_config(cfg.replace(**overrides) if overrides else cfg)


def federate(
    config: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int | None = None,
    described: dict | None = None,
) -> dict:
    """Run the federation on hospitals you prepared (features already embedded).

    ``config.hospitals`` is set to ``len(hospitals)``; ``n_classes`` defaults to the largest
    label in any split plus one (at least 2); ``described`` (``dataset``, ``backbone``, ...)
    labels the results. Returns the metrics, as :func:`run` does.
    """
    if not hospitals:
        raise ConfigError("federate needs at least one hospital")
    if len(hospitals) != config.hospitals:
        config = dataclasses.replace(config, hospitals=len(hospitals))
    if n_classes is None:
        top = max(
            int(max(h.train_labels.max(initial=0), h.test_labels.max(initial=0))) for h in hospitals
        )
        n_classes = max(2, top + 1)
    described = {
        "dataset": "custom",
        "backbone": "precomputed",
        "backbone_weights": "unknown",
        "backbone_pretrained": True,
        **(described or {}),
    }
    if config.mode == "updates":
        from medfed.experiments.updates import federate_updates

        return federate_updates(config, hospitals, n_classes, dict(described))
    from medfed.runner import federate as federate_embeddings

    return federate_embeddings(config, hospitals, n_classes, dict(described))
