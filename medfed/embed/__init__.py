"""Frozen DeiT backbones, batched embedding extraction and an on-disk feature cache.

Importing this package is cheap: ``torch`` and ``timm`` are imported only inside the functions
that need them.
"""

from medfed.embed.backbones import (
    BACKBONES,
    BackboneError,
    BackboneInfo,
    UntrainedBackboneWarning,
    create_backbone,
    default_img_size,
    hub_enabled,
    resolve_backbone_name,
)
from medfed.embed.cache import (
    FeatureCache,
    cache_key,
    default_cache_dir,
    embed_dataset_split,
    file_sha256,
)
from medfed.embed.extract import embed_images, preprocess

__all__ = [
    "BACKBONES",
    "BackboneError",
    "BackboneInfo",
    "FeatureCache",
    "UntrainedBackboneWarning",
    "cache_key",
    "create_backbone",
    "default_cache_dir",
    "default_img_size",
    "embed_dataset_split",
    "embed_images",
    "file_sha256",
    "hub_enabled",
    "preprocess",
    "resolve_backbone_name",
]
