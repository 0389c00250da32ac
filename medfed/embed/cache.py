"""On-disk cache of backbone features, keyed by model, weights, dataset file, split and size.

Each entry is ``<key>.npy`` (the features) plus a ``<key>.json`` sidecar holding the
:class:`~medfed.embed.backbones.BackboneInfo`, so a cache hit needs neither torch nor a model.
Both files are written atomically (temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from medfed.embed.backbones import (
    BackboneError,
    BackboneInfo,
    _warn_untrained,
    create_backbone,
    default_img_size,
    hub_enabled,
    resolve_backbone_name,
)
from medfed.errors import without_unsafe_advice

__all__ = [
    "CACHE_FORMAT",
    "FeatureCache",
    "cache_key",
    "default_cache_dir",
    "embed_dataset_split",
    "file_sha256",
]

CACHE_FORMAT = 1
"""Bump when preprocessing or the on-disk layout changes, so old entries stop matching."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(model_name: str, weights: str, dataset_sha256: str, split: str, img_size: int) -> str:
    """Hex SHA-256 over all fields (and :data:`CACHE_FORMAT`)."""
    fields = {
        "format": CACHE_FORMAT,
        "model": str(model_name),
        "weights": str(weights),
        "dataset_sha256": str(dataset_sha256),
        "split": str(split),
        "img_size": int(img_size),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$MEDFED_CACHE_DIR`` if set, else ``~/.cache/medfed/features``."""
    env = os.environ.get("MEDFED_CACHE_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medfed" / "features"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FeatureCache:
    """A directory of ``<key>.npy`` feature arrays with ``<key>.json`` metadata sidecars."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"FeatureCache(root={str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """Path of the features file for ``key``."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}; build keys with cache_key(...).")
        return self.root / f"{key}.npy"

    def meta_path_for(self, key: str) -> Path:
        """Path of the JSON sidecar for ``key``."""
        return self.path_for(key).with_suffix(".json")

    def delete(self, key: str) -> None:
        """Remove both files of an entry (missing files are ignored)."""
        for path in (self.path_for(key), self.meta_path_for(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _corrupt(self, key: str, path: Path, reason: str) -> None:
        reason = without_unsafe_advice(reason) or "not a plain array"  # never "allow_pickle=..."
        warnings.warn(
            f"feature cache file {str(path)!r} is unusable ({reason}); deleting it, the features "
            f"will be recomputed.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.delete(key)

    def load(self, key: str) -> np.ndarray | None:
        """Cached features, or None when absent. A corrupt file is warned about and deleted."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            self._corrupt(key, path, f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(features, np.ndarray) or features.ndim != 2 or features.dtype.kind != "f":
            self._corrupt(key, path, "not a 2-D float array")
            return None
        return features

    def load_meta(self, key: str) -> dict[str, Any] | None:
        """The JSON sidecar, or None when absent. A corrupt sidecar is warned about and deleted."""
        path = self.meta_path_for(key)
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self._corrupt(key, path, f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(meta, dict):
            self._corrupt(key, path, "not a JSON object")
            return None
        return meta

    def save(self, key: str, features: np.ndarray, meta: dict[str, Any] | None = None) -> Path:
        """Atomically write features (and the optional JSON ``meta`` sidecar); return the path."""
        path = self.path_for(key)
        array = np.ascontiguousarray(features)
        _atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))
        if meta is not None:
            text = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
            _atomic_write(self.meta_path_for(key), lambda fh: fh.write(text))
        return path


def _info_from_meta(meta: dict[str, Any]) -> BackboneInfo:
    raw = meta["info"]
    return BackboneInfo(
        name=str(raw["name"]),
        pretrained=bool(raw["pretrained"]),
        weights=str(raw["weights"]),
        embed_dim=int(raw["embed_dim"]),
        img_size=int(raw["img_size"]),
        mean=tuple(float(v) for v in raw["mean"]),
        std=tuple(float(v) for v in raw["std"]),
    )


def _load_hit(cache: FeatureCache, key: str, n: int) -> tuple[np.ndarray, BackboneInfo] | None:
    features = cache.load(key)
    if features is None:
        return None
    meta = cache.load_meta(key)
    if meta is None:
        if cache.path_for(key).is_file():  # features without a sidecar: incomplete entry
            cache._corrupt(key, cache.meta_path_for(key), "metadata sidecar missing")
        return None
    try:
        info = _info_from_meta(meta)
    except (KeyError, TypeError, ValueError) as exc:
        cache._corrupt(key, cache.meta_path_for(key), f"bad metadata: {exc!r}")
        return None
    if features.shape != (n, info.embed_dim) or not np.isfinite(features).all():
        cache._corrupt(
            key,
            cache.path_for(key),
            f"shape {features.shape} or values do not match {n} images x {info.embed_dim}",
        )
        return None
    return features.astype(np.float32, copy=False), info


_LAST_BACKBONE: dict[tuple, tuple] = {}


def _memo_backbone(timm_name: str, weights_path: Path | None, img_size, allow_hub: bool):
    """Build a backbone once for consecutive splits of one run (keeps only the last one)."""
    key = (timm_name, str(weights_path), img_size, allow_hub)
    if key not in _LAST_BACKBONE:
        _LAST_BACKBONE.clear()
        _LAST_BACKBONE[key] = create_backbone(
            timm_name, weights=weights_path, img_size=img_size, allow_hub=allow_hub, seed=0
        )
    elif not _LAST_BACKBONE[key][1].pretrained:
        _warn_untrained(timm_name, 0)  # as loud on reuse as on creation
    return _LAST_BACKBONE[key]


def embed_dataset_split(
    dataset_path: Path,
    split: str,
    images: np.ndarray,
    model_name: str,
    weights: str | Path | None,
    img_size: int | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    progress: bool = True,
    allow_hub: bool = True,
) -> tuple[np.ndarray, BackboneInfo, bool]:
    """Embed one dataset split, through the feature cache. Returns ``(features, info, hit)``.

    The key covers the timm model name, the weights identity (``file:<sha256>``, ``hub`` or
    ``random-init-seed0``), the dataset file's SHA-256, the split and the image size. A hit
    builds no model; with no weights file the ``hub`` entry is tried first (only when the hub
    is allowed), then ``random-init-seed0``. On a miss the model is built and the entry is keyed
    by the weights that actually loaded.
    """
    from medfed.embed.extract import embed_images

    timm_name = resolve_backbone_name(model_name)
    size = int(img_size) if img_size is not None else default_img_size(timm_name)
    dataset_sha = file_sha256(dataset_path)
    cache = cache if cache is not None else FeatureCache()
    n = int(np.shape(images)[0]) if np.ndim(images) else 0

    weights_path: Path | None = None
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise BackboneError(
                f"Weights file {str(weights_path)!r} does not exist. Pass --weights with the path "
                f"of a timm .safetensors/.pth checkpoint for {timm_name}."
            )
        identities = [f"file:{file_sha256(weights_path)}"]
    else:
        identities = (["hub"] if hub_enabled(allow_hub) else []) + ["random-init-seed0"]

    for identity in identities:
        hit = _load_hit(cache, cache_key(timm_name, identity, dataset_sha, split, size), n)
        if hit is not None:
            features, info = hit
            if weights_path is not None:
                info = replace(info, weights=str(weights_path))
            if not info.pretrained:
                _warn_untrained(timm_name, 0)
            return features, info, True

    model, info = _memo_backbone(timm_name, weights_path, img_size, allow_hub)
    if weights_path is not None:
        identity = identities[0]
    else:
        identity = "hub" if info.weights == "hub" else "random-init-seed0"
    features = embed_images(
        model,
        info,
        images,
        batch_size=batch_size,
        progress=progress,
        description=f"embedding {split}",
    )
    key = cache_key(timm_name, identity, dataset_sha, split, size)
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "model": timm_name,
        "weights_identity": identity,
        "dataset_path": str(dataset_path),
        "dataset_sha256": dataset_sha,
        "split": split,
        "img_size": size,
        "shape": list(features.shape),
        "info": asdict(info),
    }
    cache.save(key, features, meta=meta)
    return features, info, False
