"""Mode "embeddings" under threshold keys: the run, its plaintext references and metrics.

The federation is :mod:`medfed.fl.threshold_embeddings`; this module provisions it (no shared
key: the hospitals make their key shares in the run), plans the dropouts of ``--dropouts``,
and reports the run next to the same schedule on plaintext. Imports neither TenSEAL nor torch.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from medfed.config import SimulationConfig
from medfed.modes.common import (
    bytes_per_sample,
    check_count,
    described_run,
    finish,
    pooled_accuracy,
    run_in_workspace,
    traffic,
    used_subsets,
    yardsticks,
)

if TYPE_CHECKING:
    from medfed.fl.faults import Fault
    from medfed.fl.workspace import HospitalData
    from medfed.modes.base import Mode

#: The threshold preset of training on the joint keys (depth 6, N 32768: docs/security.md).
PRESET = "training"


def dropout_faults(cfg: SimulationConfig) -> tuple[Fault, ...]:
    """``--dropouts K``: K hospitals (seeded choice) stop answering from the refresh of epoch
    ``epochs // 2`` on, after their data is in: their key shares must be recovered."""
    import numpy as np

    from medfed.fl.faults import Fault

    if not cfg.dropouts:
        return ()
    chosen = np.random.default_rng(cfg.seed).choice(cfg.hospitals, cfg.dropouts, replace=False)
    return tuple(Fault("dropout", int(i), f"element-{cfg.epochs // 2}") for i in sorted(chosen))


def federate_threshold(
    mode: Mode,
    cfg: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int,
    described: dict[str, Any],
    started: float | None = None,
) -> dict[str, Any]:
    """The federation under threshold keys and its plaintext references."""
    from medfed.crypto.threshold import THRESHOLD_PRESETS
    from medfed.experiments.references import plaintext_reference
    from medfed.fl.ciphers import forget_threshold_parties
    from medfed.fl.threshold_embeddings import ThresholdEmbeddingsSettings
    from medfed.fl.workspace import HospitalProvision, check_hospitals
    from medfed.train.head import HeadSchedule
    from medfed.train.poly import fit_sigmoid

    t0 = started if started is not None else time.perf_counter()
    approx = fit_sigmoid(cfg.sigmoid_degree, cfg.sigmoid_radius)
    schedule = HeadSchedule(cfg.epochs, cfg.lr, approx, cfg.l2)
    check_count(cfg, hospitals)
    check_hospitals(hospitals, n_classes)
    d = hospitals[0].train_features.shape[1]
    params = THRESHOLD_PRESETS[PRESET].with_parties(cfg.hospitals)
    reference_on = functools.partial(
        plaintext_reference,
        hospitals,
        n_classes,
        schedule,
        params.batch_size,
        cfg.bucket,
        cfg.feature_scale,
        components=cfg.components,
        samples_per_component=cfg.samples_per_component,
    )
    provision = HospitalProvision(
        keys="threshold",
        bucket=cfg.bucket,
        n_classes=n_classes,
        ckks=f"threshold:{PRESET}",  # OpenFHE's preset; the hospitals make the keys in the run
        feature_scale=cfg.feature_scale,
        components=cfg.components,
        samples_per_component=cfg.samples_per_component,
    )
    settings = ThresholdEmbeddingsSettings(
        schedule=schedule,
        n_classes=n_classes,
        n_features=d,
        bucket=cfg.bucket,
        expected_hospitals=cfg.hospitals,
        threshold_preset=PRESET,
        min_hospitals=min(2, cfg.hospitals),
        components=cfg.components,
        samples_per_component=cfg.samples_per_component,
    )
    run = run_in_workspace(
        cfg,
        hospitals,
        settings,
        [provision] * len(hospitals),
        None,  # no provisioned key: the hospitals make their key shares in the run
        label="encrypted training, threshold keys",
        unit="epochs",
        steps=cfg.epochs,
        faults=dropout_faults(cfg),
        on_exit=forget_threshold_parties,
        apps=mode.federation_apps("threshold"),
    )
    fed = run.fed
    used = used_subsets(fed, hospitals)
    reference = reference_on(**used)
    evaluated = set(fed.get("evaluated_by", []))
    done = [e for e in run.evaluations if e is not None and e["hospital"] in evaluated]
    total, accuracy = pooled_accuracy(done)
    cipher = fed["cipher"]
    metrics = {
        **described_run(cfg, described, n_classes, d),
        "threshold_params": params.to_dict(),
        "sigmoid": {"degree": approx.degree, "radius": approx.radius, "coeffs": approx.coeffs},
        "epochs": cfg.epochs,
        "lr": schedule.lr,
        "l2": schedule.l2,
        "components": cfg.components,
        "samples_per_component": cfg.samples_per_component,
        "bucket": cfg.bucket,
        "trained_features": fed["layout"]["n_features"],
        **yardsticks(
            cfg,
            hospitals,
            done,
            reference,
            trained_on=used["trained_on"],
            accuracy=accuracy,
            n_classes=n_classes,
        ),
        "test_samples_evaluated": total,
        "wall_seconds": time.perf_counter() - t0,
        "federation_seconds": run.seconds,
        "setup_seconds": fed["setup_seconds"],
        "train_seconds": fed["train_seconds"],
        "seconds_per_epoch": fed["train_seconds"] / max(1, cfg.epochs),
        **traffic(fed),
        "refreshes_per_epoch": len(fed["refreshes"])
        and sum(r["ciphertexts"] for r in fed["refreshes"]) / max(1, cfg.epochs),
        "threshold": {
            "t": cipher["t"],
            "n": cipher["n"],
            "tolerates": cipher["n"] - cipher["t"],
            "decryptions": cipher["decryptions"],
            "max_decryptions": cipher["max_decryptions"],
            "recoveries": cipher["recoveries"],
        },
        "cipher": cipher,
        "dropouts": cfg.dropouts,
        "dropped": fed["dropped"],
        "layout": fed["layout"],
        "excluded": fed["excluded"],
        "contributors": fed.get("contributors", {}),
        "dp": None,
    }
    metrics["bytes_per_sample"] = bytes_per_sample(metrics["bytes_per_party"], hospitals)
    rounds = fed["rounds"] + [{"stage": "refresh", **r} for r in fed["refreshes"]]
    return finish(cfg, metrics, rounds)
