"""One federation run, start to finish: the library entry point behind ``medfed.simulate``."""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.config import ConfigError, SimulationConfig

if TYPE_CHECKING:
    from medfed.fl.workspace import HospitalData

# TenSEAL, Flower and torch are imported inside the functions: mode "updates" with threshold
# keys runs in a Python 3.10 environment that has none of them (see run_updates).

log = logging.getLogger(__name__)


def run(cfg: SimulationConfig) -> dict:
    """Prepare data (load, validate, embed, partition), then :func:`federate`.

    Mode "updates" goes to :func:`medfed.experiments.updates.run_updates`.
    """
    if cfg.mode == "updates":
        from medfed.experiments.updates import run_updates

        return run_updates(cfg)
    from medfed.experiments.prepare import prepare

    started = time.perf_counter()
    data = prepare(cfg)
    return federate(cfg, data.hospitals, data.dataset.n_classes, data.described, started)


def federate(
    cfg: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int,
    described: dict,
    started: float | None = None,
) -> dict:
    """Run the encrypted federation and the plaintext references on prepared hospitals."""
    from medfed.crypto.context import make_secret_context, secret_context_bytes
    from medfed.crypto.params import get_preset
    from medfed.experiments.references import plaintext_reference
    from medfed.experiments.results import byte_tally, progress_bar, write_run
    from medfed.experiments.yardsticks import federation_yardsticks
    from medfed.fl.aggregator import AggregatorSettings
    from medfed.fl.faults import parse_faults
    from medfed.fl.launch import run_federation
    from medfed.fl.workspace import check_hospitals, provision, read_evaluations
    from medfed.train.head import HeadSchedule
    from medfed.train.poly import fit_sigmoid

    t0 = started if started is not None else time.perf_counter()
    params = get_preset(cfg.ckks)
    approx = fit_sigmoid(cfg.sigmoid_degree, cfg.sigmoid_radius)
    schedule = HeadSchedule(cfg.epochs, cfg.lr, approx, cfg.l2)
    if len(hospitals) != cfg.hospitals:
        raise ConfigError(f"expected {cfg.hospitals} hospitals, got {len(hospitals)}")
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
    secret = make_secret_context(params)  # provisioned to hospitals only (shared-key setup)
    meta = {
        "bucket": cfg.bucket,
        "n_classes": n_classes,
        "ckks": params.name,
        "feature_scale": cfg.feature_scale,
        "components": cfg.components,
        "samples_per_component": cfg.samples_per_component,
        "decay": schedule.decay,  # the L2 penalty's shrink per epoch, lr * l2 (public)
    }
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
    with tempfile.TemporaryDirectory(prefix="medfed-hospitals-") as ws:
        workspace = Path(ws)
        for i, h in enumerate(hospitals):
            provision(workspace, i, h, secret_context_bytes(secret), meta)
        del secret
        t_fed = time.perf_counter()
        with progress_bar("encrypted training", cfg.progress) as progress:
            task = progress.add_task("epochs", total=cfg.epochs)
            fed = run_federation(
                workspace,
                settings,
                cfg.hospitals,
                backend=cfg.backend,
                client_cpus=cfg.client_cpus,
                ray_address=cfg.ray_address,
                on_step=lambda step: progress.advance(task),
                faults=parse_faults(cfg.inject),
            )
        federation_seconds = time.perf_counter() - t_fed
        evaluations = read_evaluations(workspace, cfg.hospitals)

    subsets = _reference_subsets(fed, hospitals)
    if subsets is not None:  # hospitals were excluded: the references leave the same ones out
        reference = reference_on(**subsets)
    evaluated = set(fed.get("evaluated_by", [h.name for h in hospitals]))
    done = [e for e in evaluations if e is not None and e["hospital"] in evaluated]
    total = sum(e["total"] for e in done)
    correct = sum(e["correct"] for e in done)
    accuracy = correct / total if total else float("nan")
    # the yardsticks on the federation's split: the tuned reference pools the train data of
    # the hospitals that passed upload; every score is on the test samples behind `accuracy`
    used = _used_subsets(fed, hospitals)
    yardsticks = federation_yardsticks(
        hospitals,
        done,
        trained_on=used["trained_on"],
        accuracy=accuracy,
        plaintext_accuracy=reference["plaintext_accuracy"],
        plaintext_weights=reference["plaintext_weights"],
        plaintext_test=reference["plaintext_test"],
        n_classes=n_classes,
        seed=cfg.seed,
    )
    up, down, parties = byte_tally(fed)
    metrics = {
        "mode": cfg.mode,
        "keys": cfg.keys,
        "hospitals": cfg.hospitals,
        **described,
        "n_classes": n_classes,
        "embed_dim": d,
        "ckks": {**params.to_dict(), "depth": params.depth, "slots": params.slots},
        "sigmoid": {"degree": approx.degree, "radius": approx.radius, "coeffs": approx.coeffs},
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "l2": cfg.l2,
        "components": cfg.components,
        "samples_per_component": cfg.samples_per_component,
        "trained_features": fed["layout"]["n_features"],
        **yardsticks,  # accuracy, auc, the tuned reference, majority, costs and gaps
        "test_samples_evaluated": total,
        "wall_seconds": time.perf_counter() - t0,
        "federation_seconds": federation_seconds,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_per_party": parties,
        "refreshes_per_epoch": 1,
        "workers": cfg.workers,
        "layout": fed["layout"],
        "excluded": fed["excluded"],
        "contributors": fed.get("contributors", {}),
    }
    z = [e["max_abs_z"] for e in done if "max_abs_z" in e]
    metrics["max_abs_z"] = max(z) if z else None  # on the hospitals' own training data
    if z and max(z) > approx.radius:
        log.warning(
            "the trained head reaches |z| = %.1f on the hospitals' training data, beyond the "
            "polynomial sigmoid's range [-%g, %g]: the encrypted loss is not the logistic loss "
            "there, and training may have diverged. Raise --l2 or --sigmoid-radius, or lower "
            "--lr.",
            max(z),
            approx.radius,
            approx.radius,
        )
    if cfg.out:
        rounds = fed["rounds"] + [{"stage": "refresh", **r} for r in fed["refreshes"]]
        write_run(Path(cfg.out), cfg.to_dict(), metrics, rounds)
    return metrics


def _reference_subsets(fed: dict, hospitals: list[HospitalData]) -> dict | None:
    """Hospital indices whose data the federation used at each stage; None when all were."""
    subsets = _used_subsets(fed, hospitals)
    if all(v == list(range(len(hospitals))) for v in subsets.values()):
        return None
    return subsets


def _used_subsets(fed: dict, hospitals: list[HospitalData]) -> dict[str, list[int]]:
    """Hospital indices whose data the federation used: ``normalized_over`` (passed
    ``stats``), ``trained_on`` (passed ``upload``), ``evaluated_on`` (evaluated the head)."""
    names = [h.name for h in hospitals]
    used = fed.get("contributors") or {}

    def indices(stage: str) -> list[int]:
        kept = set(used.get(stage, names))
        return [i for i, n in enumerate(names) if n in kept]

    subsets = {
        "normalized_over": indices("stats"),
        "trained_on": indices("upload"),
        "evaluated_on": [i for i, n in enumerate(names) if n in fed.get("evaluated_by", names)],
    }
    return subsets
