"""Fast tests for medfed.embed (tiny deit at 32 px, random init, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

import medfed.embed.cache as cache_mod
from medfed.embed import (
    BACKBONES,
    BackboneError,
    BackboneInfo,
    FeatureCache,
    UntrainedBackboneWarning,
    cache_key,
    create_backbone,
    embed_dataset_split,
    embed_images,
    file_sha256,
    preprocess,
    resolve_backbone_name,
)

TINY = "deit_tiny"
SIZE = 32


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedBackboneWarning)
        return create_backbone(TINY, img_size=SIZE)


def _images(n: int = 6, size: int = 28, rgb: bool = False, seed: int = 0) -> np.ndarray:
    shape = (n, size, size, 3) if rgb else (n, size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _info(img_size: int = SIZE) -> BackboneInfo:
    return BackboneInfo(
        name="x", pretrained=False, weights="random-init", embed_dim=192, img_size=img_size,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )  # fmt: skip


def test_import_is_cheap():
    code = "import sys, medfed.embed; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_registry_resolution():
    assert resolve_backbone_name("deit_tiny") == "deit_tiny_patch16_224"
    assert resolve_backbone_name("deit_base_patch16_224") == "deit_base_patch16_224"
    for short, full in BACKBONES.items():
        assert resolve_backbone_name(short) == full
    with pytest.raises(BackboneError, match="Did you mean: deit_tiny") as err:
        resolve_backbone_name("deit_tiy")
    assert isinstance(err.value, ValueError)
    assert "deit_small" in str(err.value)


def test_create_backbone_untrained_warns_and_is_deterministic(tiny):
    model, info = tiny
    assert info == BackboneInfo(
        name="deit_tiny_patch16_224", pretrained=False, weights="random-init", embed_dim=192,
        img_size=SIZE, mean=info.mean, std=info.std,
    )  # fmt: skip
    assert len(info.mean) == 3 and len(info.std) == 3
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.warns(UntrainedBackboneWarning, match="--weights"):
        model2, info2 = create_backbone(TINY, img_size=SIZE, seed=0)
    images = _images()
    a = embed_images(model, info, images, progress=False)
    b = embed_images(model2, info2, images, progress=False)
    assert np.array_equal(a, b)
    with pytest.warns(UntrainedBackboneWarning):
        model3, info3 = create_backbone(TINY, img_size=SIZE, seed=1)
    assert not np.allclose(a, embed_images(model3, info3, images, progress=False))


@pytest.mark.parametrize("rgb", [False, True])
def test_preprocess_shapes(rgb):
    x = preprocess(_images(n=3, size=28, rgb=rgb), _info(SIZE))
    assert tuple(x.shape) == (3, 3, SIZE, SIZE)
    assert str(x.dtype) == "torch.float32"
    # greyscale is repeated to 3 channels (before per-channel normalisation)
    if not rgb:
        info = _info(28)
        grey = preprocess(_images(n=1), info)
        std, mean = np.array(info.std), np.array(info.mean)
        raw = grey[0].numpy() * std[:, None, None] + mean[:, None, None]
        assert np.allclose(raw[0], raw[1], atol=1e-5) and np.allclose(raw[0], raw[2], atol=1e-5)


def test_preprocess_constant_image_and_validation():
    info = _info(SIZE)
    x = preprocess(np.full((2, 28, 28), 255, np.uint8), info).numpy()
    expected = (1.0 - np.array(info.mean)) / np.array(info.std)
    assert np.allclose(x, expected[None, :, None, None], atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((2, 28, 28), np.float32), info)
    with pytest.raises(ValueError, match="channels last"):
        preprocess(np.zeros((2, 3, 28, 28), np.uint8), info)


def test_embed_images(tiny, capsys):
    model, info = tiny
    feats = embed_images(model, info, _images(n=5, rgb=True), batch_size=2, progress=True)
    assert feats.shape == (5, info.embed_dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert embed_images(model, info, _images(n=0), progress=False).shape == (0, info.embed_dim)
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(model, info, _images(), batch_size=0)


def test_weights_file_roundtrip(tiny, tmp_path):
    import torch

    model, info = tiny
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    loaded, linfo = create_backbone(TINY, weights=path, img_size=SIZE)
    assert linfo.pretrained and linfo.weights == str(path)
    images = _images()
    assert np.array_equal(
        embed_images(model, info, images, progress=False),
        embed_images(loaded, linfo, images, progress=False),
    )


def test_wrong_weights_file(tmp_path):
    import torch

    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(TINY, weights=tmp_path / "missing.pth", img_size=SIZE)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo": torch.zeros(3)}, unrelated)
    with pytest.raises(BackboneError, match="expected a timm checkpoint for 'deit_tiny"):
        create_backbone(TINY, weights=unrelated, img_size=SIZE)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 7), "pos_embed": torch.zeros(1, 5, 7)}, wrong_shape)
    with pytest.raises(BackboneError, match="does not fit deit_tiny_patch16_224"):
        create_backbone(TINY, weights=wrong_shape, img_size=SIZE)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="does not fit"):
        create_backbone(TINY, weights=garbage, img_size=SIZE)


def test_cache_key_fields():
    base = dict(model_name="m", weights="hub", dataset_sha256="a" * 64, split="train", img_size=32)
    key = cache_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(**base) == key
    for field, value in [
        ("model_name", "m2"), ("weights", "random-init-seed0"), ("dataset_sha256", "b" * 64),
        ("split", "test"), ("img_size", 224),
    ]:  # fmt: skip
        assert cache_key(**{**base, field: value}) != key


def test_feature_cache_roundtrip_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFED_CACHE_DIR", str(tmp_path / "env"))
    assert FeatureCache().root == tmp_path / "env"
    cache = FeatureCache(tmp_path / "c")
    key = cache_key("m", "hub", "0" * 64, "train", 32)
    assert cache.load(key) is None
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = cache.save(key, feats)
    assert path == cache.path_for(key) and path.is_file()
    assert np.array_equal(cache.load(key), feats)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    path.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert cache.load(key) is None
    assert not path.exists()
    with pytest.raises(ValueError, match="invalid cache key"):
        cache.path_for("../escape")


def test_embed_dataset_split_cache(tmp_path, monkeypatch):
    dataset = tmp_path / "ds.npz"
    dataset.write_bytes(b"dataset-bytes-v1")
    images = _images(n=4)
    cache = FeatureCache(tmp_path / "cache")
    kw = dict(img_size=SIZE, cache=cache, progress=False)

    with pytest.warns(UntrainedBackboneWarning):
        feats, info, hit = embed_dataset_split(dataset, "train", images, TINY, None, **kw)
    assert not hit and feats.shape == (4, 192) and info.weights == "random-init"

    def boom(*args, **kwargs):
        raise AssertionError("cache hit must not build a model")

    monkeypatch.setattr(cache_mod, "create_backbone", boom)
    cache_mod._LAST_BACKBONE.clear()  # forget the memoised model of this run
    with pytest.warns(UntrainedBackboneWarning):  # still loud on a hit
        feats2, info2, hit2 = embed_dataset_split(dataset, "train", images, TINY, None, **kw)
    assert hit2 and info2 == info and np.array_equal(feats, feats2)
    # another split / dataset content is a different key -> miss -> needs a model
    with pytest.raises(AssertionError, match="must not build"):
        embed_dataset_split(dataset, "val", images, TINY, None, **kw)
    dataset.write_bytes(b"dataset-bytes-v2")
    with pytest.raises(AssertionError, match="must not build"):
        embed_dataset_split(dataset, "train", images, TINY, None, **kw)
    dataset.write_bytes(b"dataset-bytes-v1")

    # a corrupt entry is deleted and recomputed
    key = cache_key("deit_tiny_patch16_224", "random-init-seed0", file_sha256(dataset), "train", 32)
    cache.path_for(key).write_bytes(b"corrupt")
    monkeypatch.setattr(cache_mod, "create_backbone", create_backbone)
    with pytest.warns(RuntimeWarning, match="unusable"), pytest.warns(UntrainedBackboneWarning):
        feats3, _, hit3 = embed_dataset_split(dataset, "train", images, TINY, None, **kw)
    assert not hit3 and np.array_equal(feats3, feats)
    assert cache.load(key) is not None and cache.load_meta(key) is not None

    # hub allowed: the "hub" key misses, then the random-init entry is found (no model built)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(cache_mod, "create_backbone", boom)
    with pytest.warns(UntrainedBackboneWarning):
        _, _, hit4 = embed_dataset_split(dataset, "train", images, TINY, None, **kw)
    assert hit4


def test_embed_dataset_split_weights_file(tiny, tmp_path, monkeypatch):
    import torch

    model, _ = tiny
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    dataset = tmp_path / "ds.npz"
    dataset.write_bytes(b"data")
    cache = FeatureCache(tmp_path / "cache")
    kw = dict(img_size=SIZE, cache=cache, progress=False)
    feats, info, hit = embed_dataset_split(dataset, "test", _images(), TINY, weights, **kw)
    assert not hit and info.pretrained
    moved = tmp_path / "moved.pth"
    weights.rename(moved)
    monkeypatch.setattr(cache_mod, "create_backbone", None)  # a hit must not call it
    feats2, info2, hit2 = embed_dataset_split(dataset, "test", _images(), TINY, moved, **kw)
    assert hit2 and info2.weights == str(moved) and np.array_equal(feats, feats2)
    with pytest.raises(BackboneError, match="does not exist"):
        embed_dataset_split(dataset, "test", _images(), TINY, weights, **kw)


def test_hub_offline_uses_local_hf_cache_or_falls_back(tiny, tmp_path, monkeypatch):
    import torch

    import medfed.embed.backbones as bb

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(bb, "_cached_hub_file", lambda name: None)
    with pytest.warns(UntrainedBackboneWarning):
        _, info = create_backbone(TINY, img_size=SIZE)
    assert info.weights == "random-init"

    cached = tmp_path / "model.pth"
    torch.save(tiny[0].state_dict(), cached)
    monkeypatch.setattr(bb, "_cached_hub_file", lambda name: cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedBackboneWarning)
        _, info = create_backbone(TINY, img_size=SIZE)
    assert info.pretrained and info.weights == "hub"

    # the cache keys such a run by "hub"; with the hub disallowed that entry is not used
    dataset = tmp_path / "ds.npz"
    dataset.write_bytes(b"data")
    cache = FeatureCache(tmp_path / "cache")
    kw = dict(img_size=SIZE, cache=cache, progress=False)
    _, info1, hit1 = embed_dataset_split(dataset, "train", _images(), TINY, None, **kw)
    assert not hit1 and info1.weights == "hub"
    _, info2, hit2 = embed_dataset_split(dataset, "train", _images(), TINY, None, **kw)
    assert hit2 and info2.weights == "hub"
    with pytest.warns(UntrainedBackboneWarning):
        _, info3, hit3 = embed_dataset_split(
            dataset, "train", _images(), TINY, None, allow_hub=False, **kw
        )
    assert not hit3 and info3.weights == "random-init"
