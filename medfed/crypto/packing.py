"""SIMD slot layout for encrypted head training (pure numpy, no HE context needed).

Feature-major, class-segmented layout. A ciphertext's slots are split into ``n_segments``
segments of ``seg_size`` slots (one segment per one-vs-rest class; one segment for binary
tasks). Every segment holds the same ``seg_size`` samples, so one ct*ct serves all classes.

* Feature ``j`` of a block of samples is one ciphertext, replicated in every segment.
* Column ``d`` (the last) is the validity mask: 1 for a real sample, 0 for padding. It doubles
  as the bias feature, so padding contributes nothing to any gradient.
* Labels are one ciphertext per block: segment ``k`` holds ``1[y == k]`` (binary: ``y``).
* Weights are one ciphertext per feature: segment ``k`` holds ``w[j, k]`` in every slot.

Hospitals announce only a number of *buckets* (``ceil(n / bucket)``); the aggregator assigns
each a contiguous range of virtual sample positions, so only bucket counts leak. Hospitals
encrypt zeros outside their range and the aggregator adds their ciphertexts block by block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class LayoutError(ValueError):
    """A slot layout that cannot hold the data, or data that does not fit a layout."""


@dataclass(frozen=True)
class SlotLayout:
    """Where every hospital's samples live in the aggregated ciphertexts."""

    slots: int
    n_segments: int
    bucket: int
    n_features: int  # d, without the bias/validity column
    allocations: tuple[tuple[int, int], ...]  # per hospital: (start, padded length)

    @property
    def seg_size(self) -> int:
        """Samples per ciphertext block (a multiple of ``bucket``)."""
        return (self.slots // self.n_segments) // self.bucket * self.bucket

    @property
    def n_padded(self) -> int:
        return sum(length for _, length in self.allocations)

    @property
    def n_blocks(self) -> int:
        """Ciphertext blocks per feature column."""
        return max(1, math.ceil(self.n_padded / self.seg_size))

    @property
    def n_columns(self) -> int:
        """Feature ciphertexts per block, including the validity/bias column."""
        return self.n_features + 1

    def blocks_of(self, hospital: int) -> list[int]:
        start, length = self.allocations[hospital]
        if length == 0:
            return []
        return list(range(start // self.seg_size, (start + length - 1) // self.seg_size + 1))

    def to_dict(self) -> dict:
        return {
            "slots": self.slots,
            "n_segments": self.n_segments,
            "bucket": self.bucket,
            "n_features": self.n_features,
            "allocations": [list(a) for a in self.allocations],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SlotLayout:
        return cls(
            slots=int(d["slots"]),
            n_segments=int(d["n_segments"]),
            bucket=int(d["bucket"]),
            n_features=int(d["n_features"]),
            allocations=tuple((int(a), int(b)) for a, b in d["allocations"]),
        )


def n_buckets(n_samples: int, bucket: int) -> int:
    """What a hospital announces instead of its sample count."""
    return math.ceil(n_samples / bucket)


def plan_layout(
    buckets_per_hospital: list[int], *, slots: int, n_classes: int, bucket: int, n_features: int
) -> SlotLayout:
    """Assign each hospital a contiguous, bucket-aligned range of virtual sample positions."""
    n_segments = 1 if n_classes == 2 else n_classes
    if slots // n_segments < bucket:
        raise LayoutError(
            f"{n_classes} classes need {n_segments} segments of at least {bucket} slots, but a "
            f"ciphertext has only {slots} slots; use a larger CKKS preset or a smaller bucket."
        )
    if any(b < 0 for b in buckets_per_hospital):
        raise LayoutError("bucket counts must be non-negative")
    allocations, start = [], 0
    for b in buckets_per_hospital:
        allocations.append((start, b * bucket))
        start += b * bucket
    return SlotLayout(slots, n_segments, bucket, n_features, tuple(allocations))


def label_targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_segments) 0/1 targets: the label itself for binary tasks, one-hot otherwise."""
    labels = np.asarray(labels, dtype=np.int64)
    if n_classes == 2:
        return labels.reshape(-1, 1).astype(np.float64)
    return np.eye(n_classes, dtype=np.float64)[labels]


def pack_hospital(
    features: np.ndarray, labels: np.ndarray, n_classes: int, layout: SlotLayout, hospital: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Slot vectors one hospital encrypts: ``{block: (X (d+1, slots), Y (slots,))}``."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if d != layout.n_features:
        raise LayoutError(f"features have {d} columns, the layout expects {layout.n_features}")
    start, length = layout.allocations[hospital]
    if n > length:
        raise LayoutError(f"hospital {hospital} has {n} samples but only {length} slots")
    targets = label_targets(labels, n_classes)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    seg = layout.seg_size
    for block in layout.blocks_of(hospital):
        x = np.zeros((d + 1, layout.slots))
        y = np.zeros(layout.slots)
        lo = max(start, block * seg)
        hi = min(start + n, (block + 1) * seg)
        if hi > lo:
            rows = slice(lo - start, hi - start)
            offs = slice(lo - block * seg, hi - block * seg)
            for k in range(layout.n_segments):
                base = k * seg
                sl = slice(base + offs.start, base + offs.stop)
                x[:d, sl] = features[rows].T
                x[d, sl] = 1.0
                y[sl] = targets[rows, k]
        out[block] = (x, y)
    return out


def segment_sums(vec: np.ndarray, layout: SlotLayout) -> np.ndarray:
    """Sum of each segment's slots, shape (n_segments,)."""
    seg = layout.seg_size
    return np.asarray(vec)[: layout.n_segments * seg].reshape(layout.n_segments, seg).sum(axis=1)


def replicate(values: np.ndarray, layout: SlotLayout) -> np.ndarray:
    """Slot vector whose segment ``k`` holds ``values[k]`` everywhere (zeros past the segments)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != layout.n_segments:
        raise LayoutError(f"expected {layout.n_segments} values, got {values.shape[0]}")
    out = np.zeros(layout.slots)
    seg = layout.seg_size
    out[: layout.n_segments * seg] = np.repeat(values, seg)
    return out


def unreplicate(vec: np.ndarray, layout: SlotLayout) -> np.ndarray:
    """Inverse of :func:`replicate`: the mean of each segment (robust to CKKS noise)."""
    return segment_sums(vec, layout) / layout.seg_size
