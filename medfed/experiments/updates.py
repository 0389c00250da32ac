"""Mode "updates"' data: hospitals from a features file or the embeddings pipeline, and the
dropout plan (the run driver is :mod:`medfed.modes.updates`).

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

from pathlib import Path

import numpy as np

from medfed.config import SimulationConfig
from medfed.data.medmnist import DatasetError
from medfed.fl.workspace import HospitalData

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
    """(hospitals, n_classes, described) from ``cfg.features``, partitioned as ``cfg`` says."""
    from medfed.experiments.prepare import split_hospitals

    f = load_features(cfg.features)
    splits = _Splits(f["train_labels"], f["test_labels"])
    hospitals = split_hospitals(cfg, splits, f["train_features"], f["test_features"])
    return hospitals, f["n_classes"], f["described"]


def hospitals_from_pipeline(cfg: SimulationConfig) -> tuple[list[HospitalData], int, dict]:
    """(hospitals, n_classes, described) from the embeddings pipeline (needs torch)."""
    from medfed.experiments.prepare import prepare

    data = prepare(cfg)
    return data.hospitals, data.dataset.n_classes, data.described


def dropout_plan(cfg: SimulationConfig) -> dict[int, int]:
    """``--dropouts K``: K hospitals (seeded choice) stop answering from round ``rounds // 2``."""
    if not cfg.dropouts:
        return {}
    chosen = np.random.default_rng(cfg.seed).choice(cfg.hospitals, cfg.dropouts, replace=False)
    return {int(i): cfg.rounds // 2 for i in sorted(chosen)}
