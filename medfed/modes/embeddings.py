"""Mode "embeddings": the aggregator trains the head on the hospitals' encrypted embeddings
(one shared CKKS key, held by the hospitals only), against the same schedule on plaintext.

TenSEAL, Flower and torch are imported inside the methods that run a federation.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medfed.config import SimulationConfig, mode_spec
from medfed.modes import register_mode
from medfed.modes.base import Mode
from medfed.modes.common import (
    check_count,
    described_run,
    finish,
    indices,
    pooled_accuracy,
    run_in_workspace,
    traffic,
    yardsticks,
)

if TYPE_CHECKING:
    from rich.table import Table

    from medfed.fl.launch import FederationApps
    from medfed.fl.workspace import HospitalData

log = logging.getLogger(__name__)


class EmbeddingsMode(Mode):
    """The aggregator runs full-batch descent on encrypted, packed embeddings.

    Its checks (the CKKS preset has the levels one epoch needs) and fault stages
    (``upload``, ``sum-<epoch>``, ...) are in its :class:`~medfed.config.ModeSpec`.
    """

    spec = mode_spec("embeddings")

    def federate(
        self,
        cfg: SimulationConfig,
        hospitals: list[HospitalData],
        n_classes: int,
        described: dict[str, Any],
        started: float | None = None,
    ) -> dict[str, Any]:
        """The encrypted federation and its plaintext references on prepared hospitals."""
        from medfed.crypto.masking import refresh_security
        from medfed.crypto.params import get_preset
        from medfed.experiments.references import plaintext_reference
        from medfed.fl.aggregator import AggregatorSettings
        from medfed.fl.workspace import HospitalProvision, check_hospitals
        from medfed.train.head import HeadSchedule
        from medfed.train.poly import fit_sigmoid

        t0 = started if started is not None else time.perf_counter()
        params = get_preset(cfg.ckks)
        approx = fit_sigmoid(cfg.sigmoid_degree, cfg.sigmoid_radius)
        schedule = HeadSchedule(cfg.epochs, cfg.lr, approx, cfg.l2)
        check_count(cfg, hospitals)
        check_hospitals(hospitals, n_classes)
        d = hospitals[0].train_features.shape[1]
        reference_on = functools.partial(  # the same-schedule plaintext run, on given subsets
            plaintext_reference,
            hospitals,
            n_classes,
            schedule,
            params.slots,
            cfg.bucket,
            cfg.feature_scale,
            components=cfg.components,
            samples_per_component=cfg.samples_per_component,
        )
        reference = reference_on()
        provision = HospitalProvision(
            bucket=cfg.bucket,
            n_classes=n_classes,
            ckks=params.name,
            feature_scale=cfg.feature_scale,
            components=cfg.components,
            samples_per_component=cfg.samples_per_component,
        )
        settings = AggregatorSettings(
            params=params,
            schedule=schedule,
            n_classes=n_classes,
            n_features=d,
            bucket=cfg.bucket,
            expected_hospitals=cfg.hospitals,
            # never train on (and send every hospital a head of) a single hospital's data alone
            min_hospitals=min(2, cfg.hospitals),
            workers=cfg.workers,
            # under Flower's simulation the hospitals' actors already hold every CPU
            cpus_per_worker=0.0 if cfg.backend == "flower" else 1.0,
            components=cfg.components,
            samples_per_component=cfg.samples_per_component,
        )
        run = run_in_workspace(
            cfg,
            hospitals,
            settings,
            [provision] * len(hospitals),
            params.name,  # one key, provisioned to the hospitals only (shared-key setup)
            label="encrypted training",
            unit="epochs",
            steps=cfg.epochs,
            apps=self.federation_apps(),
        )
        fed = run.fed
        used = used_subsets(fed, hospitals)
        if any(v != list(range(len(hospitals))) for v in used.values()):
            reference = reference_on(**used)  # hospitals were excluded: leave them out too
        evaluated = set(fed.get("evaluated_by", [h.name for h in hospitals]))
        done = [e for e in run.evaluations if e is not None and e["hospital"] in evaluated]
        total, accuracy = pooled_accuracy(done)
        metrics = {
            **described_run(cfg, described, n_classes, d),
            "ckks": {**params.to_dict(), "depth": params.depth, "slots": params.slots},
            "sigmoid": {"degree": approx.degree, "radius": approx.radius, "coeffs": approx.coeffs},
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "l2": cfg.l2,
            "components": cfg.components,
            "samples_per_component": cfg.samples_per_component,
            "bucket": cfg.bucket,  # hospitals announce ceil(n / bucket)
            "allow_small_bucket": cfg.allow_small_bucket,  # bucket < 32 opted into (a leak)
            "trained_features": fed["layout"]["n_features"],
            # accuracy, auc, the tuned reference (on the hospitals that passed upload), ...
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
            **traffic(fed),
            "refreshes_per_epoch": 1,
            # the masks' union bound over the run, from the twin's values (check: same counts)
            **refresh_security(reference["refreshes"], fed["refreshes"]),
            "workers": cfg.workers,
            "layout": fed["layout"],
            "excluded": fed["excluded"],
            "contributors": fed.get("contributors", {}),
        }
        z = [e["max_abs_z"] for e in done if "max_abs_z" in e]
        metrics["max_abs_z"] = max(z) if z else None  # on the hospitals' own training data
        if z and max(z) > approx.radius:
            log.warning(
                "the trained head reaches |z| = %.1f on the hospitals' training data, beyond "
                "the polynomial sigmoid's range [-%g, %g]: the encrypted loss is not the "
                "logistic loss there, and training may have diverged. Raise --l2 or "
                "--sigmoid-radius, or lower --lr.",
                max(z),
                approx.radius,
                approx.radius,
            )
        rounds = fed["rounds"] + [{"stage": "refresh", **r} for r in fed["refreshes"]]
        return finish(cfg, metrics, rounds)

    def federation_apps(self) -> FederationApps:
        """The aggregator and the Flower apps of this mode's protocol."""
        from medfed.fl.launch import builtin_apps

        return builtin_apps(self.name)

    def summary_table(self, metrics: Mapping[str, Any]) -> Table:
        """The summary table: the encrypted-trained head against the same loop on plaintext."""
        from medfed.experiments.results import summary_table

        return summary_table(metrics)


def used_subsets(fed: Mapping[str, Any], hospitals: list[HospitalData]) -> dict[str, list[int]]:
    """Hospital indices whose data the federation used: ``normalized_over`` (passed
    ``stats``), ``trained_on`` (passed ``upload``), ``evaluated_on`` (evaluated the head)."""
    names = [h.name for h in hospitals]
    used = fed.get("contributors") or {}
    return {
        "normalized_over": indices(hospitals, used.get("stats", names)),
        "trained_on": indices(hospitals, used.get("upload", names)),
        "evaluated_on": indices(hospitals, fed.get("evaluated_by", names)),
    }


MODE = register_mode(EmbeddingsMode())
