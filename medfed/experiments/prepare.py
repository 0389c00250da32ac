"""The hospitals' datasets, from a config: the one place that builds :class:`HospitalData`.

Two sources, partitioned the same way (:func:`split_hospitals`: ``--split``, ``--alpha``,
``--seed``), so both give the same hospitals:

* the embeddings pipeline (:func:`prepare`): resolve and validate the MedMNIST file, embed
  both splits with the frozen backbone (cached), partition; needs torch;
* a precomputed features file (``--features FILE``, mode "updates"; :func:`load_features`),
  needs no torch: an ``.npz`` with

  * ``train_features`` (N, d) and ``test_features`` (M, d): float embeddings, one row a sample;
  * ``train_labels`` (N,) and ``test_labels`` (M,): integer class indices;
  * optionally ``n_classes`` (int; default: largest label + 1, at least 2), ``dataset``,
    ``backbone``, ``backbone_weights`` and ``backbone_pretrained`` (metadata for the results).

  ``simulations/export_features.py`` writes such a file from the embeddings pipeline.

:func:`hospitals_from_pipeline` and :func:`hospitals_from_features` give both as
``(hospitals, n_classes, described)``. Nothing here imports torch, timm or TenSEAL at module
level: with ``--features`` and threshold keys a run works in the Python 3.10 OpenFHE
environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfed.config import SimulationConfig
from medfed.data import (
    DatasetError,
    MedMNISTDataset,
    load_dataset,
    partition_indices,
    resolve_dataset,
)
from medfed.fl.workspace import HospitalData

if TYPE_CHECKING:
    from medfed.embed import BackboneInfo

log = logging.getLogger(__name__)

#: The arrays every features file holds.
FEATURE_KEYS = ("train_features", "train_labels", "test_features", "test_labels")


@dataclass(frozen=True)
class PreparedData:
    """What the embeddings pipeline gives: the dataset, the backbone, both splits' embeddings
    and the hospitals partitioned from them."""

    dataset: MedMNISTDataset
    backbone: BackboneInfo
    train_features: np.ndarray
    test_features: np.ndarray
    hospitals: list[HospitalData]
    cache_hits: dict[str, bool]

    @property
    def described(self) -> dict:
        """What the run report says about the data and the backbone."""
        return {
            "dataset": self.dataset.name,
            "backbone": self.backbone.name,
            "backbone_weights": self.backbone.weights,
            "backbone_pretrained": self.backbone.pretrained,
            "embedding_cache_hits": self.cache_hits,
        }


def embed(cfg: SimulationConfig, dataset: MedMNISTDataset) -> tuple[dict, BackboneInfo, dict]:
    """Both splits' embeddings with ``cfg``'s backbone, through the feature cache:
    (features by split, the backbone, cache hit by split)."""
    from medfed.embed import FeatureCache, embed_dataset_split

    cache = FeatureCache(cfg.cache_dir) if cfg.cache_dir else FeatureCache()
    feats, hits, info = {}, {}, None
    for split in ("train", "test"):
        images, _ = dataset.split(split)
        feats[split], info, hits[split] = embed_dataset_split(
            dataset.path,
            split,
            images,
            cfg.model,
            cfg.weights,
            img_size=cfg.img_size,
            cache=cache,
            progress=cfg.progress,
        )
        if not np.all(np.isfinite(feats[split])):
            raise DatasetError(
                f"{split} embeddings of {dataset.path.name} contain NaN/Inf; delete the cache "
                f"({cache.root}) and re-run, or check --weights."
            )
    return feats, info, hits


def split_hospitals(
    cfg: SimulationConfig,
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
) -> list[HospitalData]:
    """Seeded partition of the train split (iid or Dirichlet) and an iid share of the test split."""
    parts = partition_indices(
        train_labels, cfg.hospitals, scheme=cfg.split, alpha=cfg.alpha, seed=cfg.seed
    )
    test_parts = partition_indices(
        test_labels, cfg.hospitals, scheme="iid", seed=cfg.seed, min_size=0
    )
    return [
        HospitalData(
            name=f"hospital-{i}",
            train_features=train[p],
            train_labels=train_labels[p],
            test_features=test[q],
            test_labels=test_labels[q],
        )
        for i, (p, q) in enumerate(zip(parts, test_parts, strict=True))
    ]


def prepare(cfg: SimulationConfig) -> PreparedData:
    """The embeddings pipeline: dataset, embeddings (cached) and the hospitals (needs torch)."""
    path: Path = resolve_dataset(cfg.dataset, cfg.data_root)
    dataset = load_dataset(path)
    log.info(
        "dataset %s: %d classes, %s, %d px",
        dataset.name,
        dataset.n_classes,
        dataset.sizes if hasattr(dataset, "sizes") else "",
        dataset.image_size,
    )
    feats, info, hits = embed(cfg, dataset)
    _, y_train = dataset.split("train")
    _, y_test = dataset.split("test")
    hospitals = split_hospitals(cfg, feats["train"], y_train, feats["test"], y_test)
    return PreparedData(dataset, info, feats["train"], feats["test"], hospitals, hits)


def hospitals_from_pipeline(cfg: SimulationConfig) -> tuple[list[HospitalData], int, dict]:
    """(hospitals, n_classes, described) from the embeddings pipeline (needs torch)."""
    data = prepare(cfg)
    return data.hospitals, data.dataset.n_classes, data.described


def hospitals_from_features(cfg: SimulationConfig) -> tuple[list[HospitalData], int, dict]:
    """(hospitals, n_classes, described) from ``cfg.features``, partitioned as ``cfg`` says."""
    f = load_features(cfg.features)
    hospitals = split_hospitals(
        cfg, f["train_features"], f["train_labels"], f["test_features"], f["test_labels"]
    )
    return hospitals, f["n_classes"], f["described"]


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
        if "pickle" in str(e):  # numpy's text advises an unsafe load (allow_pickle): not relayed
            raise DatasetError(
                f"{path} holds pickled (object) data, which medfed does not load; store the "
                "features as float arrays and the labels as integer arrays (np.savez)"
            ) from None
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
