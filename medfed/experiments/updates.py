"""One mode-"updates" run, start to finish (what ``medfed.runner.run`` calls for that mode).

Data come from the embeddings pipeline (``--dataset``/``--model``, needs torch) or from a
precomputed features file (``--features FILE``, needs no torch): an ``.npz`` with

* ``train_features`` (N, d) and ``test_features`` (M, d): float embeddings, one row a sample;
* ``train_labels`` (N,) and ``test_labels`` (M,): integer class indices;
* optionally ``n_classes`` (int; default: largest label + 1, at least 2), ``dataset``,
  ``backbone``, ``backbone_weights`` and ``backbone_pretrained`` (metadata for the results).

``simulations/export_features.py`` writes such a file from the embeddings pipeline. The train
split is partitioned over the hospitals exactly as in mode "embeddings" (``--split``,
``--alpha``, ``--seed``), so both sources give the same hospitals.

Nothing here imports TenSEAL, torch or timm at module level: with ``--features`` and threshold
keys the run works in the Python 3.10 OpenFHE environment.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from medfed.config import ConfigError, SimulationConfig
from medfed.data.medmnist import DatasetError
from medfed.fl.workspace import HospitalData

log = logging.getLogger(__name__)

FEATURE_KEYS = ("train_features", "train_labels", "test_features", "test_labels")
#: Stages of the key setup and the statistics round (the rest is the training phase).
SETUP_STAGES = ("key-", "public-context", "stats")


class _Splits:
    """Just enough of a MedMNISTDataset for :func:`medfed.experiments.prepare.split_hospitals`."""

    def __init__(self, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
        self.labels = {"train": train_labels, "test": test_labels}

    def split(self, name: str) -> tuple[None, np.ndarray]:
        return None, self.labels[name]


def load_features(path: str | Path) -> dict:
    """Read and validate a features file; :class:`DatasetError` names the problem and fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"features file {path} does not exist; write one with "
            "`python simulations/export_features.py --dataset breastmnist --out FILE`"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not a readable .npz file ({e})") from None
    missing = [k for k in FEATURE_KEYS if k not in arrays]
    if missing:
        raise DatasetError(
            f"{path} lacks {', '.join(missing)}; a features file holds {', '.join(FEATURE_KEYS)} "
            "(see simulations/export_features.py)"
        )
    out: dict = {"path": str(path)}
    for split in ("train", "test"):
        x = np.asarray(arrays[f"{split}_features"])
        y = np.asarray(arrays[f"{split}_labels"])
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if x.ndim != 2 or not len(x) or not np.issubdtype(x.dtype, np.number):
            raise DatasetError(f"{path}: {split}_features must be a non-empty (samples, d) array")
        if not np.all(np.isfinite(x)):
            raise DatasetError(f"{path}: {split}_features contains NaN/Inf; re-export the file")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DatasetError(
                f"{path}: {split}_labels must hold one non-negative integer class per sample "
                f"({len(x)}), got shape {y.shape} and dtype {y.dtype}"
            )
        out[f"{split}_features"] = x.astype(np.float64)
        out[f"{split}_labels"] = y.astype(np.int64)
    if out["train_features"].shape[1] != out["test_features"].shape[1]:
        raise DatasetError(f"{path}: train and test features have different widths")
    top = int(max(out["train_labels"].max(), out["test_labels"].max())) + 1
    n_classes = int(arrays["n_classes"]) if "n_classes" in arrays else max(2, top)
    if n_classes < max(2, top):
        raise DatasetError(f"{path}: n_classes={n_classes} but labels go up to {top - 1}")
    out["n_classes"] = n_classes

    def meta(key: str, default):
        return arrays[key].item() if key in arrays else default

    out["described"] = {
        "dataset": str(meta("dataset", path.stem)),
        "backbone": str(meta("backbone", "precomputed")),
        "backbone_weights": str(meta("backbone_weights", "unknown")),
        "backbone_pretrained": bool(meta("backbone_pretrained", True)),
        "features_file": str(path),
    }
    return out


def hospitals_from_features(cfg: SimulationConfig) -> tuple[list[HospitalData], int, dict]:
    from medfed.experiments.prepare import split_hospitals

    f = load_features(cfg.features)
    splits = _Splits(f["train_labels"], f["test_labels"])
    hospitals = split_hospitals(cfg, splits, f["train_features"], f["test_features"])
    return hospitals, f["n_classes"], f["described"]


def hospitals_from_pipeline(cfg: SimulationConfig) -> tuple[list[HospitalData], int, dict]:
    from medfed.experiments.prepare import prepare

    data = prepare(cfg)
    return data.hospitals, data.dataset.n_classes, data.described


def dropout_plan(cfg: SimulationConfig) -> dict[int, int]:
    """``--dropouts K``: K hospitals (seeded choice) stop answering from round ``rounds // 2``."""
    if not cfg.dropouts:
        return {}
    chosen = np.random.default_rng(cfg.seed).choice(cfg.hospitals, cfg.dropouts, replace=False)
    return {int(i): cfg.rounds // 2 for i in sorted(chosen)}


def run_updates(cfg: SimulationConfig) -> dict:
    """Load data, run the federation and plain FedAvg on the same schedule, write results."""
    started = time.perf_counter()
    if cfg.mode != "updates":
        raise ConfigError(f"run_updates runs mode 'updates', not {cfg.mode!r}")
    if cfg.keys == "threshold":  # fail before any data work on a Python without OpenFHE
        from medfed.crypto.threshold import _require_openfhe

        _require_openfhe()
    if cfg.features:
        hospitals, n_classes, described = hospitals_from_features(cfg)
    else:
        hospitals, n_classes, described = hospitals_from_pipeline(cfg)
    return federate_updates(cfg, hospitals, n_classes, described, started)


def federate_updates(
    cfg: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int,
    described: dict,
    started: float | None = None,
    *,
    threshold_preset: str = "default",
) -> dict:
    """The encrypted FedAvg federation and its plaintext references on prepared hospitals."""
    from medfed.experiments.results import byte_tally, progress_bar, write_run
    from medfed.experiments.updates_reference import fedavg_reference
    from medfed.experiments.yardsticks import federation_yardsticks
    from medfed.fl.ciphers import forget_threshold_parties
    from medfed.fl.faults import parse_faults
    from medfed.fl.launch import run_federation
    from medfed.fl.updates import UpdatesSettings
    from medfed.fl.workspace import provision, read_evaluations

    t0 = started if started is not None else time.perf_counter()
    if len(hospitals) != cfg.hospitals:
        raise ConfigError(f"expected {cfg.hospitals} hospitals, got {len(hospitals)}")
    d = hospitals[0].train_features.shape[1]
    backend = cfg.backend
    if cfg.keys == "threshold" and backend != "local":
        log.warning(
            "threshold keys run on the local backend (Flower Messages through the in-process "
            "LocalGrid): a hospital's OpenFHE key share cannot be serialized, and Flower's Ray "
            "simulation may serve one hospital from several processes"
        )
        backend = "local"
    plan = dropout_plan(cfg)
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
    meta = {
        "keys": cfg.keys,
        "n_classes": n_classes,
        "ckks": cfg.ckks,
        "feature_scale": cfg.feature_scale,
        "components": cfg.components,
        "samples_per_component": cfg.samples_per_component,
    }
    secret = None
    if cfg.keys == "shared":  # one CKKS key, provisioned to the hospitals only
        from medfed.crypto.context import make_secret_context, secret_context_bytes
        from medfed.crypto.params import get_preset

        secret = secret_context_bytes(make_secret_context(get_preset(cfg.ckks)))
    with tempfile.TemporaryDirectory(prefix="medfed-hospitals-") as ws:
        workspace = Path(ws)
        for i, h in enumerate(hospitals):
            offline = {"offline_from_round": plan[i]} if i in plan and backend != "local" else {}
            provision(workspace, i, h, secret, {**meta, **offline})
        del secret
        t_fed = time.perf_counter()
        try:
            with progress_bar(f"FedAvg, {cfg.keys} keys", cfg.progress) as progress:
                task = progress.add_task("rounds", total=cfg.rounds)
                fed = run_federation(
                    workspace,
                    settings,
                    cfg.hospitals,
                    backend=backend,
                    client_cpus=cfg.client_cpus,
                    ray_address=cfg.ray_address,
                    on_step=lambda step: progress.advance(task),
                    unresponsive=plan if backend == "local" else None,
                    faults=parse_faults(cfg.inject),  # --inject, on top of --dropouts
                )
        finally:
            forget_threshold_parties(workspace)
        federation_seconds = time.perf_counter() - t_fed
        evaluations = read_evaluations(workspace, cfg.hospitals)

    index = {h.name: i for i, h in enumerate(hospitals)}
    stats_by = [index[n] for n in fed["stats_participants"]]
    evaluators = [index[e["hospital"]] for e in evaluations if e is not None]
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
        stats_participants=stats_by,
        evaluators=evaluators,
    )
    done = [e for e in evaluations if e is not None]
    total = sum(e["total"] for e in done)
    correct = sum(e["correct"] for e in done)
    accuracy = correct / total if total else float("nan")
    yardsticks = federation_yardsticks(  # the tuned reference pools every round's participants
        hospitals,
        done,
        trained_on=sorted({index[n] for names in fed["participants"] for n in names}),
        accuracy=accuracy,
        plaintext_accuracy=reference["plaintext_accuracy"],
        plaintext_weights=reference["plaintext_weights"],
        plaintext_test=reference["plaintext_test"],
        n_classes=n_classes,
        seed=cfg.seed,
    )
    up, down, parties = byte_tally(fed)
    training = [r for r in fed["rounds"] if not r["stage"].startswith(SETUP_STAGES)]
    per_round = cfg.rounds * cfg.hospitals
    cipher = fed["cipher"]
    threshold = None
    if cfg.keys == "threshold":
        threshold = {"t": cipher["t"], "n": cipher["n"], "tolerates": cipher["n"] - cipher["t"]}
    metrics = {
        "mode": cfg.mode,
        "keys": cfg.keys,
        "hospitals": cfg.hospitals,
        **described,
        "n_classes": n_classes,
        "embed_dim": d,
        "backend": backend,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "lr": cfg.lr,
        "l2": cfg.l2,
        "components": cfg.components,
        "samples_per_component": cfg.samples_per_component,
        **yardsticks,  # accuracy, auc, the tuned reference, majority, costs and gaps
        "test_samples_evaluated": total,
        "dropouts": cfg.dropouts,
        "dropout_round": min(plan.values()) if plan else None,
        "dropped": fed["dropped"],
        "threshold": threshold,
        "cipher": cipher,
        "participants": fed["participants"],
        "wall_seconds": time.perf_counter() - t0,
        "federation_seconds": federation_seconds,
        "setup_seconds": fed["setup_seconds"],
        "bytes_up": up,
        "bytes_down": down,
        "bytes_per_party": parties,
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
    }
    if cfg.out:
        write_run(Path(cfg.out), cfg.to_dict(), metrics, fed["rounds"])
    return metrics
