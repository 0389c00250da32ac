"""Mode "updates": hospitals train locally, the aggregator adds their encrypted updates
(FedAvg); keys "none" (plain FedAvg), "shared" (one CKKS key) or "threshold" (OpenFHE t-of-n).

Nothing here imports TenSEAL, torch or timm at module level: with ``--features`` and
threshold keys the run works in the Python 3.10 OpenFHE environment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medfed.config import ConfigError, SimulationConfig, mode_spec
from medfed.modes import register_mode
from medfed.modes.base import Mode, Prepared
from medfed.modes.common import (
    bytes_per_sample,
    check_count,
    described_run,
    dp_guarantee,
    finish,
    indices,
    pooled_accuracy,
    prepared_hospitals,
    run_in_workspace,
    traffic,
    yardsticks,
)
from medfed.result import RunResult

if TYPE_CHECKING:
    from rich.table import Table

    from medfed.fl.launch import FederationApps
    from medfed.fl.workspace import HospitalData

log = logging.getLogger(__name__)


class UpdatesMode(Mode):
    """Encrypted-sum FedAvg, against plain FedAvg on the same schedule and participants.

    Keys "none" (plain FedAvg, the baseline), "shared" or "threshold"; options ``dropouts``
    and ``features``; its checks (no Ray batch workers, threshold keys need 2 hospitals,
    dropouts the keys tolerate) are in its :class:`~medfed.config.ModeSpec`.
    """

    spec = mode_spec("updates")

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
        *,
        threshold_preset: str = "default",
    ) -> dict[str, Any]:
        """The encrypted FedAvg federation and its plaintext references on prepared hospitals.

        ``threshold_preset``: the :mod:`medfed.crypto.threshold` preset of keys "threshold".
        """
        from medfed.experiments.updates import SETUP_STAGES, dropout_plan
        from medfed.experiments.updates_reference import fedavg_reference
        from medfed.fl.ciphers import forget_threshold_parties
        from medfed.fl.faults import dropout_faults
        from medfed.fl.updates import UpdatesSettings
        from medfed.fl.workspace import HospitalProvision

        t0 = started if started is not None else time.perf_counter()
        check_count(cfg, hospitals)
        d = hospitals[0].train_features.shape[1]
        plan = dropout_plan(cfg)
        dp = None
        if cfg.dp_epsilon is not None or cfg.dp_noise is not None:
            from medfed.privacy.accountant import noise_multiplier_for
            from medfed.privacy.mechanisms import HospitalDP, releases

            count = releases(cfg.rounds, cfg.local_epochs)
            sigma = cfg.dp_noise or noise_multiplier_for(cfg.dp_epsilon, count, cfg.dp_delta)
            # the statistics' noise shares add up to the full noise while hospitals - dropouts
            # contribute; every local step carries its own full noise
            dp = HospitalDP(
                float(sigma),
                contributors=cfg.hospitals - cfg.dropouts,
                clip=cfg.dp_clip,
                steps=cfg.rounds * cfg.local_epochs,
            )
        settings = UpdatesSettings(
            keys=cfg.keys,
            rounds=cfg.rounds,
            local_epochs=cfg.local_epochs,
            lr=cfg.lr,
            n_classes=n_classes,
            n_features=d,
            expected_hospitals=cfg.hospitals,
            ckks=cfg.ckks,
            threshold_preset=threshold_preset,
            components=cfg.components,
            l2=cfg.l2,
        )
        provision = HospitalProvision(
            keys=cfg.keys,
            n_classes=n_classes,
            ckks=cfg.ckks,
            feature_scale=cfg.feature_scale,
            components=cfg.components,
            samples_per_component=cfg.samples_per_component,
            dp=dp.to_dict() if dp else None,
        )
        provisions = [provision] * len(hospitals)
        run = run_in_workspace(
            cfg,
            hospitals,
            settings,
            provisions,
            # one CKKS key, provisioned to the hospitals only
            cfg.ckks if cfg.keys == "shared" else None,
            label=f"FedAvg, {cfg.keys} keys",
            unit="rounds",
            steps=cfg.rounds,
            faults=dropout_faults(plan),  # the planned hospitals stop answering, any backend
            on_exit=forget_threshold_parties,
            apps=self.federation_apps(),
        )
        fed = run.fed
        index = {h.name: i for i, h in enumerate(hospitals)}
        done = [e for e in run.evaluations if e is not None]
        reference = fedavg_reference(
            hospitals,
            n_classes,
            cfg.rounds,
            cfg.local_epochs,
            cfg.lr,
            cfg.feature_scale,
            components=cfg.components,
            samples_per_component=cfg.samples_per_component,
            l2=cfg.l2,
            participants=[[index[n] for n in names] for names in fed["participants"]],
            stats_participants=[index[n] for n in fed["stats_participants"]],
            evaluators=[index[e["hospital"]] for e in done],
        )
        total, accuracy = pooled_accuracy(done)
        training = [r for r in fed["rounds"] if not r["stage"].startswith(SETUP_STAGES)]
        per_round = cfg.rounds * cfg.hospitals
        cipher = fed["cipher"]
        threshold = None
        if cfg.keys == "threshold":
            threshold = {
                "t": cipher["t"],
                "n": cipher["n"],
                "tolerates": cipher["n"] - cipher["t"],
                "decryptions": cipher["decryptions"],  # made under the most-used key share
                "max_decryptions": cipher["max_decryptions"],  # the budget flooding is sized for
            }
        metrics = {
            **described_run(cfg, described, n_classes, d),
            "backend": cfg.backend,
            "rounds": cfg.rounds,
            "local_epochs": cfg.local_epochs,
            "lr": cfg.lr,
            "l2": cfg.l2,
            "components": cfg.components,
            "samples_per_component": cfg.samples_per_component,
            # accuracy, auc, the tuned reference (pooling every round's participants), ...
            **yardsticks(
                cfg,
                hospitals,
                done,
                reference,
                trained_on=indices(hospitals, (n for names in fed["participants"] for n in names)),
                accuracy=accuracy,
                n_classes=n_classes,
            ),
            "test_samples_evaluated": total,
            "dropouts": cfg.dropouts,
            "dropout_round": min(plan.values()) if plan else None,
            "dropped": fed["dropped"],
            "threshold": threshold,
            "cipher": cipher,
            "participants": fed["participants"],
            "wall_seconds": time.perf_counter() - t0,
            "federation_seconds": run.seconds,
            "setup_seconds": fed["setup_seconds"],
            **traffic(fed),
            "bytes_per_round": {  # mean per hospital per FedAvg round, training phase only
                "sent": sum(r["bytes_up"] for r in training) / per_round,
                "received": sum(r["bytes_down"] for r in training) / per_round,
            },
            "setup_bytes": sum(
                r["bytes_up"] + r["bytes_down"]
                for r in fed["rounds"]
                if r["stage"].startswith(SETUP_STAGES)
            ),
            "excluded": fed["excluded"],
            "dp": (
                dp_guarantee(
                    cfg,
                    dp,
                    stats_count=len(fed["stats_participants"]),
                    later=cfg.rounds * cfg.local_epochs,
                    step_sensitivity=2 * dp.clip,
                )
                if dp
                else None
            ),
        }
        metrics["bytes_per_sample"] = bytes_per_sample(metrics["bytes_per_party"], hospitals)
        return finish(cfg, metrics, fed["rounds"])

    def federation_apps(self) -> FederationApps:
        """The aggregator and the Flower apps of this mode's protocol."""
        from medfed.fl.launch import builtin_apps

        return builtin_apps(self.name)

    def summary_table(self, metrics: Mapping[str, Any]) -> Table:
        """The summary table: encrypted-sum FedAvg against plain FedAvg on the same schedule."""
        from medfed.experiments.results import updates_summary_table

        return updates_summary_table(metrics)


MODE = register_mode(UpdatesMode())


def run_updates(cfg: SimulationConfig) -> RunResult:
    """Load data, run the federation and plain FedAvg on the same schedule, write results."""
    if cfg.mode != "updates":
        raise ConfigError(f"run_updates runs mode 'updates', not {cfg.mode!r}")
    return RunResult.from_metrics(MODE.run(cfg))


def federate_updates(
    cfg: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int,
    described: dict[str, Any],
    started: float | None = None,
    *,
    threshold_preset: str = "default",
) -> RunResult:
    """:meth:`UpdatesMode.federate`, as a :class:`~medfed.result.RunResult`."""
    metrics = MODE.federate(
        cfg, hospitals, n_classes, described, started, threshold_preset=threshold_preset
    )
    return RunResult.from_metrics(metrics)
