"""Load and validate MedMNIST-layout ``.npz`` files.

A MedMNIST v2 file is a NumPy ``.npz`` archive with six arrays:
``{train,val,test}_images`` (``uint8``, ``(N, S, S)`` or ``(N, S, S, 3)``) and
``{train,val,test}_labels`` (integers, ``(N, 1)`` or ``(N,)``). Every problem found while
loading is reported as a :class:`DatasetError` that names the file, the problem and a fix.
"""

from __future__ import annotations

import difflib
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfed.errors import MedfedError, without_unsafe_advice

__all__ = [
    "DEFAULT_DATASET",
    "IMAGE_SIZES",
    "MEDMNIST_FLAGS",
    "SPLITS",
    "DatasetError",
    "MedMNISTDataset",
    "load_dataset",
    "resolve_dataset",
    "shipped_dataset_path",
]

DEFAULT_DATASET = "breastmnist"
"""The dataset shipped inside the package (BreastMNIST, 28 px)."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SIZES: tuple[int, ...] = (28, 64, 128, 224)

# flag -> (number of classes, multi-label?) for the 12 MedMNIST v2 2D datasets.
MEDMNIST_FLAGS: dict[str, tuple[int, bool]] = {
    "pathmnist": (9, False),
    "chestmnist": (14, True),
    "dermamnist": (7, False),
    "octmnist": (4, False),
    "pneumoniamnist": (2, False),
    "retinamnist": (5, False),
    "breastmnist": (2, False),
    "bloodmnist": (8, False),
    "tissuemnist": (8, False),
    "organamnist": (11, False),
    "organcmnist": (11, False),
    "organsmnist": (11, False),
}

_REQUIRED_KEYS: tuple[str, ...] = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
_SIZE_SUFFIX = re.compile(r"^(?P<stem>.+)_(?P<size>64|128|224)$")
_DOWNLOAD_HINT = "download the official MedMNIST npz from https://medmnist.com (hosted on Zenodo)"


class DatasetError(MedfedError, ValueError):
    """A dataset could not be found or is not a valid MedMNIST-layout ``.npz`` file.

    The message names the file (or the requested dataset), the problem and how to fix it.
    """


@dataclass(frozen=True, eq=False)
class MedMNISTDataset:
    """A validated MedMNIST-layout dataset held in memory.

    Images are ``uint8`` arrays of shape ``(N, S, S)`` (greyscale) or ``(N, S, S, 3)`` (RGB);
    labels are ``int64`` arrays of shape ``(N,)`` with values in ``[0, n_classes)``.
    Instances compare by identity (``eq=False``) because they hold arrays.
    """

    name: str
    path: Path
    n_classes: int
    n_channels: int
    image_size: int
    train_images: np.ndarray = field(repr=False)
    train_labels: np.ndarray = field(repr=False)
    val_images: np.ndarray = field(repr=False)
    val_labels: np.ndarray = field(repr=False)
    test_images: np.ndarray = field(repr=False)
    test_labels: np.ndarray = field(repr=False)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images, labels)`` for split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise DatasetError(
                f"{self.path}: unknown split {name!r}; valid splits are {', '.join(SPLITS)}"
            )
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split, e.g. ``{"train": 546, "val": 78, "test": 156}``."""
        return {s: int(getattr(self, f"{s}_labels").shape[0]) for s in SPLITS}


def shipped_dataset_path() -> Path:
    """Return the path of the BreastMNIST (28 px) ``.npz`` shipped with the package."""
    path = Path(__file__).resolve().parent / "assets" / f"{DEFAULT_DATASET}.npz"
    if not path.is_file():
        raise DatasetError(
            f"{path}: the built-in {DEFAULT_DATASET} dataset is missing from the installed "
            "package; reinstall medfed, or pass --data-root / a path to a MedMNIST .npz file"
        )
    return path


def _looks_like_path(spec: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in spec for s in seps) or spec.lower().endswith(".npz")


def _default_data_root() -> Path:
    env = os.environ.get("MEDFED_DATA_ROOT", "").strip()
    return Path(env) if env else Path("~/.medmnist")


def _file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def resolve_dataset(
    spec: str | os.PathLike[str],
    data_root: str | Path | None = None,
    size: int | None = None,
) -> Path:
    """Turn a dataset spec (a path to an ``.npz`` or a MedMNIST flag) into a file path.

    A spec containing a path separator or ending in ``.npz`` is taken as a path. Otherwise it
    is a MedMNIST 2D flag such as ``"pneumoniamnist"`` (optionally ``"pneumoniamnist_64"``):
    ``"breastmnist"`` with no ``data_root`` and no size (or 28) is the shipped file; other flags
    are looked up in ``data_root`` (default ``$MEDFED_DATA_ROOT``, else ``~/.medmnist``) as
    ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz``. With ``size=None`` the smallest available
    size wins (28, then 64, 128, 224).
    """
    if size is not None and size not in IMAGE_SIZES:
        raise DatasetError(
            f"dataset {str(spec)!r}: image size {size} is not a MedMNIST size; "
            f"use one of {', '.join(map(str, IMAGE_SIZES))}"
        )

    if isinstance(spec, os.PathLike) or _looks_like_path(str(spec)):
        path = Path(spec).expanduser()
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise DatasetError(
                f"{path}: dataset file {what}; check the path, or pass a MedMNIST flag such as "
                f"{DEFAULT_DATASET!r} instead"
            )
        return path.resolve()

    flag = str(spec).strip().lower()
    m = _SIZE_SUFFIX.match(flag)
    if m and m.group("stem") in MEDMNIST_FLAGS:
        suffix_size = int(m.group("size"))
        if size is not None and size != suffix_size:
            raise DatasetError(
                f"dataset {str(spec)!r}: the name asks for {suffix_size} px but size={size} was "
                "given; drop one of them"
            )
        flag, size = m.group("stem"), suffix_size

    if flag not in MEDMNIST_FLAGS:
        close = difflib.get_close_matches(flag, MEDMNIST_FLAGS, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise DatasetError(
            f"unknown dataset {str(spec)!r}: {hint}known MedMNIST 2D flags are "
            f"{', '.join(MEDMNIST_FLAGS)}; a path to a MedMNIST-style .npz file also works"
        )

    if flag == DEFAULT_DATASET and data_root is None and size in (None, 28):
        return shipped_dataset_path()

    root = (Path(data_root) if data_root is not None else _default_data_root()).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(
            f"{root}: the data root for dataset {flag!r} is a file, not a directory; "
            "pass --data-root DIR pointing at the folder holding the MedMNIST .npz files"
        )
    sizes = IMAGE_SIZES if size is None else (size,)
    candidates = [root / _file_name(flag, s) for s in sizes]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    missing_root = "" if root.is_dir() else f" (the data root {root} does not exist)"
    raise DatasetError(
        f"MedMNIST dataset {flag!r} not found; looked at: {looked}{missing_root}. "
        f"To fix, {_DOWNLOAD_HINT} into {root}, or pass --data-root DIR or a path to the .npz"
    )


def _dataset_name(path: Path) -> tuple[str, int | None]:
    """Return ``(name, size from the file name or None)`` for ``path``."""
    m = _SIZE_SUFFIX.match(path.stem)
    if m:
        return m.group("stem"), int(m.group("size"))
    return path.stem, None


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read the six required arrays, wrapping every I/O and format error."""
    bad = (
        f"{path}: is not a valid .npz archive ({{err}}); re-download the file or re-create it "
        "with np.savez(path, train_images=..., train_labels=..., val_images=..., ...)"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:  # numpy's text for a pickle advises an unsafe load: not relayed
        raise DatasetError(bad.format(err=without_unsafe_advice(str(err)))) from err
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise DatasetError(bad.format(err=err)) from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{path}: holds a single .npy array, not an .npz archive with the six MedMNIST "
            "arrays; save it with np.savez(path, train_images=..., train_labels=..., ...)"
        )
    with loaded:
        missing = [k for k in _REQUIRED_KEYS if k not in loaded.files]
        if missing:
            present = ", ".join(sorted(loaded.files)) or "none"
            raise DatasetError(
                f"{path}: missing arrays {', '.join(missing)} (present: {present}); a MedMNIST "
                f"file needs all of {', '.join(_REQUIRED_KEYS)}"
            )
        try:
            # Reading every array here surfaces CRC, truncation and pickle errors.
            return {k: loaded[k] for k in _REQUIRED_KEYS}
        except ValueError as err:
            if "Object arrays" in str(err):
                raise DatasetError(
                    f"{path}: contains object (pickled) arrays, which are not loaded for "
                    "safety; store images as uint8 and labels as integer arrays"
                ) from err
            raise DatasetError(bad.format(err=without_unsafe_advice(str(err)))) from err
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, KeyError) as err:
            raise DatasetError(bad.format(err=err)) from err


def _check_images(path: Path, split: str, images: np.ndarray) -> tuple[int, int, int]:
    """Validate one split's images and return ``(N, S, channels)``."""
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise DatasetError(
            f"{path}: {key} has dtype {images.dtype}, expected uint8; convert pixel values to "
            "0..255 and store them with .astype(np.uint8)"
        )
    shape = images.shape
    grey = images.ndim == 3 and shape[1] == shape[2]
    rgb = images.ndim == 4 and shape[1] == shape[2] and shape[3] == 3
    if not (grey or rgb):
        raise DatasetError(
            f"{path}: {key} has shape {shape}, expected (N, S, S) for greyscale or "
            "(N, S, S, 3) for RGB (square, channels last); squeeze a single channel axis or "
            "transpose channels-first arrays"
        )
    n, s = shape[0], shape[1]
    if s not in IMAGE_SIZES:
        raise DatasetError(
            f"{path}: {key} are {s}x{s} px, expected one of "
            f"{', '.join(map(str, IMAGE_SIZES))}; resize the images to a MedMNIST size"
        )
    if n == 0:
        raise DatasetError(
            f"{path}: the {split} split is empty (0 images); every split needs at least one sample"
        )
    return n, s, 3 if rgb else 1


def _check_labels(path: Path, split: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """Validate one split's labels and return them as int64 ``(N,)``."""
    key = f"{split}_labels"
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: {key} has dtype {labels.dtype}, expected an integer dtype; store class "
            "indices with .astype(np.int64)"
        )
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DatasetError(
            f"{path}: {key} has shape {labels.shape}: multi-label data (e.g. ChestMNIST) is not "
            "supported yet; use a single-label dataset with labels of shape (N,) or (N, 1)"
        )
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DatasetError(
            f"{path}: {key} has shape {labels.shape}, expected (N,) or (N, 1) class indices"
        )
    if labels.shape[0] != n_images:
        raise DatasetError(
            f"{path}: {key} has {labels.shape[0]} entries but {split}_images has {n_images} "
            "images; every image needs exactly one label"
        )
    if labels.min() < 0:
        raise DatasetError(
            f"{path}: {key} contains negative label {labels.min()}; class indices must be "
            "0, 1, ..., n_classes - 1"
        )
    if labels.max() > np.iinfo(np.int64).max:  # pragma: no cover - only huge uint64 values
        raise DatasetError(f"{path}: {key} has label {labels.max()}, too large for int64")
    return labels.reshape(-1).astype(np.int64)


def load_dataset(path: str | Path) -> MedMNISTDataset:
    """Load and fully validate a MedMNIST-layout ``.npz`` file.

    Raises :class:`DatasetError` (naming the file, the problem and a fix) if the file is
    missing, unreadable, or does not follow the MedMNIST v2 layout. For known MedMNIST flags
    (the file stem without a ``_64``/``_128``/``_224`` suffix) the official class count is
    used and checked; otherwise ``n_classes`` is ``max(label) + 1``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{path}: dataset file does not exist; check the path or {_DOWNLOAD_HINT}"
        )
    if not path.is_file():
        raise DatasetError(f"{path}: is not a file; pass the path of a MedMNIST .npz file")
    path = path.resolve()
    name, name_size = _dataset_name(path)

    arrays = _read_arrays(path)

    shapes: dict[str, tuple[int, int, int]] = {
        s: _check_images(path, s, arrays[f"{s}_images"]) for s in SPLITS
    }
    _, size, channels = shapes["train"]
    for s in SPLITS[1:]:
        _, s_size, s_channels = shapes[s]
        if s_size != size:
            raise DatasetError(
                f"{path}: {s}_images are {s_size} px but train_images are {size} px; all "
                "splits must use the same image size"
            )
        if s_channels != channels:
            raise DatasetError(
                f"{path}: {s}_images have {s_channels} channel(s) but train_images have "
                f"{channels}; all splits must be all greyscale or all RGB"
            )
    if name_size is not None and name_size != size:
        raise DatasetError(
            f"{path}: the file name says {name_size} px but the images are {size} px; rename "
            f"the file (e.g. to {_file_name(name, size)})"
        )

    known = MEDMNIST_FLAGS.get(name.lower())
    labels = {s: _check_labels(path, s, arrays[f"{s}_labels"], shapes[s][0]) for s in SPLITS}
    if known is not None and known[1]:
        raise DatasetError(
            f"{path}: {name} is a multi-label dataset, which is not supported yet; use a "
            "single-label MedMNIST dataset such as breastmnist or pneumoniamnist"
        )
    max_label = max(int(v.max()) for v in labels.values())
    if known is not None:
        n_classes = known[0]
        if max_label >= n_classes:
            raise DatasetError(
                f"{path}: found label {max_label}, but {name} has {n_classes} classes "
                f"(labels 0..{n_classes - 1}); fix the labels or rename the file if it is not "
                f"{name}"
            )
    else:
        n_classes = max_label + 1
        if n_classes < 2:
            raise DatasetError(
                f"{path}: all labels are 0, so there is only one class; a classifier needs at "
                "least 2 classes (labels 0..n_classes-1)"
            )

    return MedMNISTDataset(
        name=name,
        path=path,
        n_classes=n_classes,
        n_channels=channels,
        image_size=size,
        train_images=arrays["train_images"],
        train_labels=labels["train"],
        val_images=arrays["val_images"],
        val_labels=labels["val"],
        test_images=arrays["test_images"],
        test_labels=labels["test"],
    )
