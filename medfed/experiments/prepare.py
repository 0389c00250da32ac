"""From a config to hospital datasets: resolve, validate, embed (cached), partition."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.config import SimulationConfig
from medfed.data import (
    DatasetError,
    MedMNISTDataset,
    load_dataset,
    partition_indices,
    resolve_dataset,
)
from medfed.embed import BackboneInfo, FeatureCache, embed_dataset_split
from medfed.fl.workspace import HospitalData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
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
    cfg: SimulationConfig, dataset: MedMNISTDataset, train: np.ndarray, test: np.ndarray
) -> list[HospitalData]:
    """Seeded partition of the train split (iid or Dirichlet) and an iid share of the test split."""
    _, y_train = dataset.split("train")
    _, y_test = dataset.split("test")
    parts = partition_indices(
        y_train, cfg.hospitals, scheme=cfg.split, alpha=cfg.alpha, seed=cfg.seed
    )
    test_parts = partition_indices(y_test, cfg.hospitals, scheme="iid", seed=cfg.seed, min_size=0)
    return [
        HospitalData(
            name=f"hospital-{i}",
            train_features=train[p],
            train_labels=y_train[p],
            test_features=test[q],
            test_labels=y_test[q],
        )
        for i, (p, q) in enumerate(zip(parts, test_parts, strict=True))
    ]


def prepare(cfg: SimulationConfig) -> PreparedData:
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
    hospitals = split_hospitals(cfg, dataset, feats["train"], feats["test"])
    return PreparedData(dataset, info, feats["train"], feats["test"], hospitals, hits)
