"""Tests for medfed.data: MedMNIST loading/validation and hospital partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.data import (
    DEFAULT_DATASET,
    DatasetError,
    MedMNISTDataset,
    PartitionError,
    label_histogram,
    load_dataset,
    partition_indices,
    resolve_dataset,
    shipped_dataset_path,
)

SIZES = {"train": 12, "val": 4, "test": 6}


def make_arrays(
    size: int = 28, rgb: bool = False, n_classes: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    """Valid MedMNIST-layout arrays (labels (N, 1) uint8, like the official files)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in SIZES.items():
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).astype(np.uint8).reshape(n, 1)
    return arrays


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with path.open("wb") as fh:  # np.savez would append ".npz" to odd names
        np.savez(fh, **arrays)
    return path


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("rgb", [False, True])
def test_round_trip(tmp_path: Path, size: int, rgb: bool) -> None:
    arrays = make_arrays(size=size, rgb=rgb)
    path = write_npz(tmp_path / "toy.npz", arrays)
    ds = load_dataset(path)
    assert isinstance(ds, MedMNISTDataset)
    assert ds.name == "toy"
    assert ds.path == path.resolve()
    assert ds.n_classes == 3
    assert ds.n_channels == (3 if rgb else 1)
    assert ds.image_size == size
    assert ds.sizes == SIZES
    for split in ("train", "val", "test"):
        images, labels = ds.split(split)
        np.testing.assert_array_equal(images, arrays[f"{split}_images"])
        assert images.dtype == np.uint8
        assert labels.dtype == np.int64 and labels.shape == (SIZES[split],)
        np.testing.assert_array_equal(labels, arrays[f"{split}_labels"].ravel())


def test_known_flag_name_and_class_count(tmp_path: Path) -> None:
    # Size suffix is stripped from the name; known flags use the official class count.
    path = write_npz(tmp_path / "pathmnist_64.npz", make_arrays(size=64, n_classes=3))
    ds = load_dataset(path)
    assert ds.name == "pathmnist"
    assert ds.n_classes == 9


def test_one_dim_int64_labels_accepted(tmp_path: Path) -> None:
    arrays = make_arrays()
    for split in SIZES:
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"].ravel().astype(np.int64)
    assert load_dataset(write_npz(tmp_path / "flat.npz", arrays)).n_classes == 3


def test_unknown_split_lists_valid_names(tmp_path: Path) -> None:
    ds = load_dataset(write_npz(tmp_path / "toy.npz", make_arrays()))
    with pytest.raises(DatasetError, match="train, val, test"):
        ds.split("validation")


def _drop(*keys: str):
    return lambda a: {k: v for k, v in a.items() if k not in keys}


def _set(key: str, value_fn):
    return lambda a: {**a, key: value_fn(a)}


BAD_CASES = {
    "missing_keys": (_drop("val_labels", "test_images"), "val_labels, test_images"),
    "float_images": (
        _set("train_images", lambda a: a["train_images"].astype(np.float32)),
        "uint8",
    ),
    "channels_first": (
        _set("train_images", lambda a: np.zeros((12, 3, 28, 28), np.uint8)),
        "(N, S, S, 3)",
    ),
    "non_square": (_set("val_images", lambda a: np.zeros((4, 28, 27), np.uint8)), "shape"),
    "single_channel_axis": (
        _set("train_images", lambda a: a["train_images"][..., None]),
        "shape",
    ),
    "bad_size": (
        lambda a: {
            **a,
            **{f"{s}_images": np.zeros((n, 32, 32), np.uint8) for s, n in SIZES.items()},
        },
        "32x32",
    ),
    "size_mismatch": (_set("test_images", lambda a: np.zeros((6, 64, 64), np.uint8)), "64 px"),
    "channel_mismatch": (
        _set("val_images", lambda a: np.zeros((4, 28, 28, 3), np.uint8)),
        "channel",
    ),
    "empty_split": (
        lambda a: {
            **a,
            "test_images": np.zeros((0, 28, 28), np.uint8),
            "test_labels": np.zeros((0, 1), np.uint8),
        },
        "empty",
    ),
    "float_labels": (
        _set("train_labels", lambda a: a["train_labels"].astype(np.float32)),
        "integer",
    ),
    "bad_label_shape": (
        _set("train_labels", lambda a: a["train_labels"].reshape(12, 1, 1)),
        "(N,) or (N, 1)",
    ),
    "label_count": (_set("val_labels", lambda a: a["val_labels"][:3]), "3 entries"),
    "multi_label": (
        _set("train_labels", lambda a: np.zeros((12, 14), np.uint8)),
        "multi-label",
    ),
    "negative_label": (
        _set("train_labels", lambda a: -a["train_labels"].astype(np.int64)),
        "negative",
    ),
    "one_class": (
        lambda a: {**a, **{f"{s}_labels": np.zeros((n, 1), np.uint8) for s, n in SIZES.items()}},
        "at least 2 classes",
    ),
    "object_array": (
        _set("train_labels", lambda a: np.array([1, "x"], dtype=object)),
        "object",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_validation_failures_name_the_file(tmp_path: Path, case: str) -> None:
    modify, expected = BAD_CASES[case]
    path = write_npz(tmp_path / f"bad_{case}.npz", modify(make_arrays()))
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert path.name in msg
    assert expected in msg


def test_known_flag_label_out_of_range(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "pneumoniamnist.npz", make_arrays(n_classes=3))
    with pytest.raises(DatasetError, match=r"pneumoniamnist\.npz.*2 classes"):
        load_dataset(path)


def test_known_multilabel_flag_rejected(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "chestmnist.npz", make_arrays(n_classes=2))
    with pytest.raises(DatasetError, match=r"chestmnist\.npz.*multi-label"):
        load_dataset(path)


def test_size_suffix_must_match_images(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "toy_64.npz", make_arrays(size=28))
    with pytest.raises(DatasetError, match=r"toy_64\.npz.*64 px"):
        load_dataset(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothere\.npz.*does not exist"):
        load_dataset(tmp_path / "nothere.npz")


def test_truncated_file(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "trunc.npz", make_arrays())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"trunc\.npz.*not a valid \.npz"):
        load_dataset(path)


def test_corrupt_array_data(tmp_path: Path) -> None:
    # The zip directory is intact; the error only appears when an array is read (CRC).
    path = write_npz(tmp_path / "corrupt.npz", make_arrays())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"corrupt\.npz"):
        load_dataset(path)


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04garbage"])
def test_not_an_npz(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=r"junk\.npz"):
        load_dataset(path)


def test_single_npy_renamed(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with path.open("wb") as fh:
        np.save(fh, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match=r"single\.npz.*\.npy"):
        load_dataset(path)


# --------------------------------------------------------------------------- resolving


def test_resolve_shipped_default() -> None:
    path = resolve_dataset(DEFAULT_DATASET)
    assert path == shipped_dataset_path()
    assert path.is_file() and path.name == "breastmnist.npz"


def test_resolve_path(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "mine.npz", make_arrays())
    assert resolve_dataset(str(path)) == path.resolve()
    assert resolve_dataset(path) == path.resolve()
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset(str(tmp_path / "absent.npz"))


def test_resolve_flag_in_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p64 = write_npz(tmp_path / "pneumoniamnist_64.npz", make_arrays(size=64))
    assert resolve_dataset("pneumoniamnist", data_root=tmp_path) == p64.resolve()
    assert resolve_dataset("PneumoniaMNIST_64", data_root=tmp_path) == p64.resolve()
    p28 = write_npz(tmp_path / "pneumoniamnist.npz", make_arrays())
    assert resolve_dataset("pneumoniamnist", data_root=tmp_path) == p28.resolve()  # 28 first
    assert resolve_dataset("pneumoniamnist", data_root=tmp_path, size=64) == p64.resolve()
    # breastmnist with an explicit data root is looked up there, not in the package.
    b = write_npz(tmp_path / "breastmnist.npz", make_arrays(n_classes=2))
    assert resolve_dataset("breastmnist", data_root=tmp_path) == b.resolve()
    # The environment variable is the default root.
    monkeypatch.setenv("MEDFED_DATA_ROOT", str(tmp_path))
    assert resolve_dataset("pneumoniamnist") == p28.resolve()


def test_resolve_missing_flag(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset("dermamnist", data_root=tmp_path, size=128)
    msg = str(info.value)
    assert str(tmp_path / "dermamnist_128.npz") in msg
    assert "medmnist.com" in msg and "--data-root" in msg


def test_resolve_unknown_flag_suggests() -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset("pneumonia")
    msg = str(info.value)
    assert "pneumoniamnist" in msg and ".npz" in msg


def test_resolve_bad_size(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="32"):
        resolve_dataset("pathmnist", data_root=tmp_path, size=32)


def test_shipped_breastmnist() -> None:
    ds = load_dataset(resolve_dataset(DEFAULT_DATASET))
    assert ds.name == "breastmnist"
    assert ds.sizes == {"train": 546, "val": 78, "test": 156}
    assert (ds.n_classes, ds.n_channels, ds.image_size) == (2, 1, 28)
    assert ds.train_images.shape == (546, 28, 28) and ds.train_images.dtype == np.uint8
    assert np.bincount(ds.train_labels).tolist() == [147, 399]


# --------------------------------------------------------------------------- partitions


def assert_partition(parts: list[np.ndarray], n: int, n_parts: int, min_size: int) -> None:
    assert len(parts) == n_parts
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
        assert p.shape[0] >= min_size
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 300),
    n_classes=st.integers(1, 6),
    n_parts=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.05, 100.0),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    min_size=st.integers(0, 2),
)
def test_partition_properties(
    n: int, n_classes: int, n_parts: int, seed: int, alpha: float, scheme: str, min_size: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, n_classes, n)

    def run() -> list[np.ndarray] | None:
        try:
            return partition_indices(labels, n_parts, scheme, alpha, seed, min_size)
        except PartitionError:
            assert scheme == "dirichlet"  # iid never fails for a feasible request
            return None

    first, second = run(), run()
    if first is None:
        assert second is None
        return
    assert second is not None
    assert_partition(first, n, n_parts, min_size)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_iid_is_even_and_seed_dependent() -> None:
    labels = np.arange(103) % 4
    parts = partition_indices(labels, 5, "iid", seed=1)
    assert sorted(p.size for p in parts) == [20, 20, 21, 21, 21]
    other = partition_indices(labels, 5, "iid", seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_differs_from_iid() -> None:
    labels = np.repeat(np.arange(4), 250)
    n_parts = 5

    def skew(parts: list[np.ndarray]) -> float:
        hist = label_histogram(labels, parts, 4).astype(float)
        frac = hist / hist.sum(axis=1, keepdims=True)
        return float(np.abs(frac - 0.25).sum(axis=1).mean())  # distance from global mix

    iid = partition_indices(labels, n_parts, "iid", seed=0)
    dirichlet = partition_indices(labels, n_parts, "dirichlet", alpha=0.1, seed=0)
    assert_partition(dirichlet, labels.size, n_parts, 2)
    assert skew(iid) < 0.2
    assert skew(dirichlet) > 0.6


def test_label_histogram() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    np.testing.assert_array_equal(label_histogram(labels, parts, 3), [[1, 1, 0], [0, 1, 3]])
    assert label_histogram(labels, parts, 3).dtype == np.int64
    with pytest.raises(PartitionError):
        label_histogram(labels, parts, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_parts": 0}, "n_parts"),
        ({"n_parts": 6, "min_size": 2}, "cannot split 10 samples among 6 hospitals"),
        ({"n_parts": 2, "alpha": 0.0, "scheme": "dirichlet"}, "alpha"),
        ({"n_parts": 2, "alpha": float("nan")}, "alpha"),
        ({"n_parts": 2, "scheme": "powerlaw"}, "iid, dirichlet"),
        ({"n_parts": 2, "seed": -1}, "seed"),
    ],
)
def test_partition_invalid_requests(kwargs: dict, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        partition_indices(np.arange(10) % 2, **kwargs)


def test_dirichlet_impossible_raises() -> None:
    # 2 classes, tiny alpha, 20 hospitals needing 5 each: Dirichlet mass lands on few parts.
    labels = np.repeat([0, 1], 60)
    with pytest.raises(PartitionError, match="larger alpha"):
        partition_indices(labels, 20, "dirichlet", alpha=0.01, seed=0, min_size=5)


def test_partition_accepts_column_labels() -> None:
    labels = (np.arange(30) % 3).reshape(-1, 1)
    assert_partition(partition_indices(labels, 3, "dirichlet", alpha=1.0), 30, 3, 2)
