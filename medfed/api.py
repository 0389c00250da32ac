"""The library entry points: one run from a config, or a federation of your own hospitals.

Both work for every registered mode (:func:`medfed.list_modes`) and its key setups, and return
a :class:`~medfed.result.RunResult`: typed core fields, every metric by key, and
``to_dict()``, the dict written to ``metrics.json``::

    import medfed

    result = medfed.run(medfed.SimulationConfig(hospitals=3, epochs=5))
    print(result.accuracy, result.reference_accuracy, result.encryption_cost_pp)
    print(result["bytes_per_party"])  # any metric, as in metrics.json
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from medfed.config import ConfigError, SimulationConfig

if TYPE_CHECKING:
    from medfed.fl.workspace import HospitalData
    from medfed.result import RunResult


def run(config: SimulationConfig | None = None, **overrides: Any) -> RunResult:
    """Load and embed the dataset, partition it over the hospitals and run the federation.

    Args:
        config: the run (default: the built-in default, BreastMNIST over 5 hospitals).
        overrides: any :class:`SimulationConfig` field, e.g. ``hospitals=3, epochs=5``.

    Returns:
        The run's :class:`~medfed.result.RunResult` (``accuracy``, ``auc``,
        ``reference_accuracy``, ``majority_accuracy``, ``encryption_cost_pp``,
        ``plaintext_accuracy``, ``wall_seconds``, ...; ``result[key]`` reads any metric);
        with ``config.out`` set, ``result.to_dict()`` is also written to ``OUT/metrics.json``.

    Raises:
        ConfigError: an invalid value, or an override that is no config field.
    """
    from medfed.runner import run as run_config

    cfg = config if config is not None else SimulationConfig()
    return run_config(cfg.replace(**overrides) if overrides else cfg)


def federate(
    config: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int | None = None,
    described: dict | None = None,
) -> RunResult:
    """Run the federation of ``config.mode`` on hospitals you prepared (features embedded).

    Args:
        config: the run's settings (mode, keys, CKKS preset, schedule, ``out``, ...);
            ``config.hospitals`` is set to ``len(hospitals)``.
        hospitals: one :class:`~medfed.fl.workspace.HospitalData` per hospital (its name,
            train and test features and integer labels).
        n_classes: the number of classes (default: the largest label in any split plus one,
            at least 2).
        described: what the features are, recorded in the results (``dataset``,
            ``backbone``, ``backbone_weights``, ``backbone_pretrained``; default: "custom",
            "precomputed").

    Returns:
        The run's :class:`~medfed.result.RunResult`, as :func:`run` returns it; with
        ``config.out`` set, it is also written to ``OUT/metrics.json``.

    Raises:
        ConfigError: ``hospitals`` is empty.
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
    from medfed.runner import federate as federate_mode

    return federate_mode(config, hospitals, n_classes, described)
