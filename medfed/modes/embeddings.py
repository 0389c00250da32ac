"""Mode "embeddings": the aggregator trains the head on the hospitals' encrypted embeddings
(one shared CKKS key, held by the hospitals only), against the same schedule on plaintext.

TenSEAL, Flower and torch are imported inside the methods that run a federation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medfed.config import SimulationConfig, mode_spec
from medfed.modes import register_mode
from medfed.modes.base import Mode, Prepared
from medfed.modes.common import (
    bytes_per_sample,
    check_count,
    described_run,
    dp_guarantee,
    finish,
    pooled_accuracy,
    prepared_hospitals,
    run_in_workspace,
    traffic,
    used_subsets,
    yardsticks,
)

if TYPE_CHECKING:
    from rich.table import Table

    from medfed.fl.launch import FederationApps
    from medfed.fl.workspace import HospitalData
    from medfed.privacy.mechanisms import HospitalDP
    from medfed.privacy.sensitivity import OutputNoise
    from medfed.train.head import HeadSchedule

log = logging.getLogger(__name__)


class EmbeddingsMode(Mode):
    """The aggregator runs full-batch descent on encrypted, packed embeddings.

    Its checks (the CKKS preset has the levels one epoch needs) and fault stages
    (``upload``, ``sum-<epoch>``, ...) are in its :class:`~medfed.config.ModeSpec`.
    """

    spec = mode_spec("embeddings")

    def prepare(self, cfg: SimulationConfig) -> Prepared:
        """A features file (``--features``, no torch) or the embeddings pipeline."""
        return prepared_hospitals(cfg)

    def federate(
        self,
        cfg: SimulationConfig,
        hospitals: list[HospitalData],
        n_classes: int,
        described: dict[str, Any],
        started: float | None = None,
    ) -> dict[str, Any]:
        """The encrypted federation and its plaintext references on prepared hospitals."""
        if cfg.keys == "threshold":
            from medfed.modes.embeddings_threshold import federate_threshold

            return federate_threshold(self, cfg, hospitals, n_classes, described, started)
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
        schedule, dp = dp_setup(cfg, HeadSchedule(cfg.epochs, cfg.lr, approx, cfg.l2))
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
            dp_clip=cfg.dp_clip if dp else None,
        )
        reference = reference_on()
        provision = HospitalProvision(
            bucket=cfg.bucket,
            n_classes=n_classes,
            ckks=params.name,
            feature_scale=cfg.feature_scale,
            components=cfg.components,
            samples_per_component=cfg.samples_per_component,
            dp=dp.hospitals.to_dict() if dp else None,
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
            dp=dp.head if dp else None,
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
            "lr": schedule.lr,  # under DP: what the sensitivity bound allows (see "dp")
            "l2": schedule.l2,
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
            "dp": dp.guarantee(cfg, fed, len(used["normalized_over"])) if dp else None,
        }
        metrics["bytes_per_sample"] = bytes_per_sample(metrics["bytes_per_party"], hospitals)
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

    def federation_apps(self, keys: str = "shared") -> FederationApps:
        """The aggregator and the Flower apps of this mode's protocol under ``keys``."""
        from medfed.fl.launch import builtin_apps

        return builtin_apps(self.name, keys)

    def summary_table(self, metrics: Mapping[str, Any]) -> Table:
        """The summary table: the encrypted-trained head against the same loop on plaintext."""
        from medfed.experiments.results import summary_table

        return summary_table(metrics)


@dataclasses.dataclass(frozen=True)
class EmbeddingsDP:
    """Mode "embeddings"' differential privacy: what the hospitals add (noisy statistics,
    clipped feature rows) and what the aggregator adds (noise inside the final head)."""

    hospitals: HospitalDP
    head: OutputNoise
    schedule: HeadSchedule

    def guarantee(self, cfg: SimulationConfig, fed: Mapping[str, Any], stats_count: int) -> dict:
        """The metrics.json ``dp`` block: two Gaussian mechanisms (statistics, head)."""
        sch, bound = self.schedule, self.head.bound
        return dp_guarantee(
            cfg,
            self.hospitals,
            stats_count=stats_count,
            later=1,
            mechanism="output perturbation inside the final head's ciphertexts (by the aggregator)",
            head_sensitivity=(fed.get("dp_output") or {}).get("sensitivity"),
            head_noise_std=(fed.get("dp_output") or {}).get("std"),
            bound={**bound.to_dict(), "weight_radius": bound.weight_radius(sch.l2)},
            lr=sch.lr,
            l2=sch.l2,
            epochs=sch.epochs,
        )


def dp_setup(
    cfg: SimulationConfig, schedule: HeadSchedule
) -> tuple[HeadSchedule, EmbeddingsDP | None]:
    """The schedule and DP of a run: without DP, ``schedule`` as given. With DP, the bias is
    penalized too, ``l2`` is raised to the bound's minimum and ``lr`` lowered to its maximum
    where needed (logged), and one noise multiplier serves both mechanisms."""
    if cfg.dp_epsilon is None and cfg.dp_noise is None:
        return schedule, None
    from medfed.privacy.accountant import noise_multiplier_for
    from medfed.privacy.mechanisms import HospitalDP
    from medfed.privacy.sensitivity import OutputNoise, head_bound

    approx = schedule.approx
    bound = head_bound(approx.coeffs, approx.radius, cfg.dp_clip)
    l2 = max(schedule.l2, bound.min_l2)
    lr = min(schedule.lr, bound.max_lr(l2))
    if (lr, l2) != (schedule.lr, schedule.l2):
        log.warning(
            "differential privacy: the head's sensitivity bound needs l2 >= %.4g and lr <= "
            "%.4g (degree-%d sigmoid on [-%g, %g], features clipped to %g); training with "
            "l2=%.4g, lr=%.4g (docs/privacy.md)",
            bound.min_l2,
            bound.max_lr(l2),
            approx.degree,
            approx.radius,
            approx.radius,
            cfg.dp_clip,
            l2,
            lr,
        )
    schedule = dataclasses.replace(schedule, lr=lr, l2=l2, penalize_bias=True)
    sigma = cfg.dp_noise or noise_multiplier_for(cfg.dp_epsilon, 2, cfg.dp_delta)
    hospitals = HospitalDP(float(sigma), contributors=cfg.hospitals, clip=cfg.dp_clip)
    return schedule, EmbeddingsDP(hospitals, OutputNoise(float(sigma), bound), schedule)


MODE = register_mode(EmbeddingsMode())
