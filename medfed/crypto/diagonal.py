"""The "diagonal" slot layout (pure numpy; no HE context needed).

Features are cut into groups of ``g`` (a power of two). Within a group, weights live in ONE
ciphertext as a repeating pattern ``W[s] = w[s mod g]``; the hospitals upload their features as
``g`` generalized diagonals so that the forward pass is a baby-step/giant-step sum:

    k = b1 * a + b  (a < b2 giant steps, b < b1 baby steps, b1 * b2 = g)
    D[a, b][s] = x[(s - b1 a) mod S][(s + b) mod g]          (sample i sits at slot i + b1 a)
    z = sum_a rot( sum_b D[a, b] * rot(W, b), b1 a )          z[i] = sum_f w[f] x[i][f]

so one epoch costs ``n d / S`` ct*ct forward and as many backward, with ``b1 - 1`` baby
rotations per group and ``b2 - 1`` giant (Horner) rotations per block and head, as many again on
the backward residuals (the products are relinearized once per giant step). The
backward products ``Q[b] = sum_a D[a, b] * rot(r, -b1 a)`` (one relinearization per sum) are
folded into one vector per group (:func:`fold_products`) and summed into per-feature gradients
by the key holder, on masked values, with the linear map :func:`gradient_map`; it answers with
one pattern ciphertext per group: the weight layout again.

Rotation convention (SEAL's ``rotate_vector``): ``rot(v, k)[i] = v[(i + k) mod S]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from medfed.crypto.packing import LayoutError, label_targets


def rot(v: np.ndarray, k: int) -> np.ndarray:
    """Plaintext twin of a CKKS slot rotation: ``rot(v, k)[i] = v[(i + k) mod S]``."""
    return np.roll(v, -k, axis=-1)


@dataclass(frozen=True)
class DiagonalLayout:
    """Where every hospital's samples and every feature sit in the ciphertext slots of a run.

    ``slots`` per ciphertext, features cut into groups of ``group`` (``baby`` baby steps each),
    and per hospital the ``(start, padded length)`` of its contiguous sample range (multiples of
    ``bucket``); samples fill blocks of ``slots`` in that order. Sent to the hospitals as JSON
    (:meth:`to_dict`).
    """

    slots: int
    n_features: int
    n_classes: int
    group: int
    baby: int
    bucket: int
    allocations: tuple[tuple[int, int], ...]  # per hospital: (start, padded length)

    def __post_init__(self) -> None:
        g = self.group
        if g & (g - 1) or g < 2 or self.slots % g:
            raise LayoutError(f"group width {g} must be a power of two dividing {self.slots}")
        if g % self.baby:
            raise LayoutError(f"baby steps {self.baby} must divide the group width {g}")

    @property
    def giant(self) -> int:
        """Giant steps per group: ``group / baby``."""
        return self.group // self.baby

    @property
    def n_groups(self) -> int:
        """Feature groups of ``group`` features (the last one zero-padded)."""
        return math.ceil(self.n_features / self.group)

    @property
    def n_heads(self) -> int:
        """Binary tasks train one head; K-class tasks train K one-vs-rest heads."""
        return 1 if self.n_classes == 2 else self.n_classes

    @property
    def n_padded(self) -> int:
        """Sample positions of every hospital together, padding included."""
        return sum(length for _, length in self.allocations)

    @property
    def n_blocks(self) -> int:
        """Ciphertext blocks of ``slots`` sample positions (at least one)."""
        return max(1, math.ceil(self.n_padded / self.slots))

    def blocks_of(self, hospital: int) -> list[int]:
        """The blocks that hold part of the sample range of hospital (position) ``hospital``."""
        start, length = self.allocations[hospital]
        if length == 0:
            return []
        return list(range(start // self.slots, (start + length - 1) // self.slots + 1))

    def to_dict(self) -> dict:
        """The layout as a JSON-able dict (``kind: "diagonal"``), read back by :meth:`from_dict`."""
        return {
            "kind": "diagonal",
            "slots": self.slots,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "group": self.group,
            "baby": self.baby,
            "bucket": self.bucket,
            "allocations": [list(a) for a in self.allocations],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DiagonalLayout:
        """Rebuild (and check) a layout from :meth:`to_dict`'s output."""
        return cls(
            slots=int(d["slots"]),
            n_features=int(d["n_features"]),
            n_classes=int(d["n_classes"]),
            group=int(d["group"]),
            baby=int(d["baby"]),
            bucket=int(d["bucket"]),
            allocations=tuple((int(a), int(b)) for a, b in d["allocations"]),
        )


def choose_group(n_features: int, slots: int) -> tuple[int, int]:
    """Group width (power of two, at most 64) and baby steps (about sqrt of the width)."""
    g = min(64, 1 << max(1, math.ceil(math.log2(max(n_features, 2)))), slots)
    baby = 1 << (int(math.log2(g)) + 1) // 2
    return g, baby


def plan_diagonal(
    buckets_per_hospital: list[int],
    *,
    slots: int,
    n_classes: int,
    bucket: int,
    n_features: int,
) -> DiagonalLayout:
    """Place hospitals back to back (``buckets * bucket`` positions each, in list order).

    The list index is each hospital's position in the layout; the feature grouping comes from
    :func:`choose_group`.
    """
    g, baby = choose_group(n_features, slots)
    allocations, start = [], 0
    for b in buckets_per_hospital:
        allocations.append((start, b * bucket))
        start += b * bucket
    return DiagonalLayout(slots, n_features, n_classes, g, baby, bucket, tuple(allocations))


@dataclass
class DiagonalBlock:
    """One block's plaintext slot vectors, before encryption."""

    diagonals: np.ndarray  # (groups, giant, baby, slots)
    mask: np.ndarray  # (slots,) validity mask: 1 where a real sample sits (alignment a = 0)
    targets: np.ndarray  # (heads, slots) 0/1 targets


def pack_diagonal(
    features: np.ndarray, labels: np.ndarray, layout: DiagonalLayout, position: int
) -> dict[int, DiagonalBlock]:
    """The slot vectors one hospital encrypts, block by block (zeros outside its range)."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    if d != layout.n_features:
        raise LayoutError(f"features have {d} columns, the layout expects {layout.n_features}")
    start, length = layout.allocations[position]
    if n > length:
        raise LayoutError("more samples than the slots allocated to this hospital")
    G, g, S = layout.n_groups, layout.group, layout.slots
    xp = np.zeros((n, G * g))
    xp[:, :d] = x
    targets = label_targets(labels, layout.n_classes)
    out: dict[int, DiagonalBlock] = {}
    for block in layout.blocks_of(position):
        lo = max(start, block * S)
        hi = min(start + n, (block + 1) * S)
        diag = np.zeros((G, layout.giant, layout.baby, S))
        mask = np.zeros(S)
        tgt = np.zeros((layout.n_heads, S))
        if hi > lo:
            rows = np.arange(lo - start, hi - start)
            local = np.arange(lo - block * S, hi - block * S)
            mask[local] = 1.0
            tgt[:, local] = targets[rows].T
            for a in range(layout.giant):
                s = (local + layout.baby * a) % S
                for b in range(layout.baby):
                    feat = (s + b) % g
                    for gi in range(G):
                        diag[gi, a, b, s] = xp[rows, gi * g + feat]
        out[block] = DiagonalBlock(diag, mask, tgt)
    return out


def rotate_by(v, steps: int, unit: int, rotate) -> object:
    """Rotate ``v`` by ``unit * steps`` with one rotation by ``unit * 2^j`` per set bit of
    ``steps`` (the power-of-two keys of :func:`rotation_steps`)."""
    j = 0
    while steps >> j:
        if steps >> j & 1:
            v = rotate(v, unit << j)
        j += 1
    return v


def baby_rotations(w, lo: int, hi: int, baby: int, group: int, rotate) -> dict[int, object]:
    """``{b: rot(w, b)}`` for ``lo <= b <= hi`` (``1 <= lo``, ``hi < baby``), the cheaper way:
    ``+1`` steps from ``w`` (``hi`` rotations), or one ``+baby`` step then ``-1`` steps
    (``1 + baby - lo``; needs ``baby < group`` for the key)."""
    out: dict[int, object] = {}
    if hi <= 1 + baby - lo or baby >= group:
        v = w
        for b in range(1, hi + 1):
            v = rotate(v, 1)
            if b >= lo:
                out[b] = v
        return out
    v = rotate(w, baby)
    for b in range(baby - 1, lo - 1, -1):
        v = rotate(v, -1)
        if b <= hi:
            out[b] = v
    return out


def cell_steps(cells: range, block: int, giant: int) -> range:
    """The giant steps of ``block`` among forward cells ``block * giant + a`` (maybe empty)."""
    return range(max(cells.start - block * giant, 0), min(cells.stop - block * giant, giant))


def fold_products(q: Sequence, first: int, rotate) -> object:
    """``sum_i rot(q[i], -(first + i))``: baby-step products aligned on one feature pattern.

    ``q[i]`` (baby step ``first + i``) holds at slot ``s`` a term of feature
    ``(s + first + i) mod g``; after the fold every slot ``s`` holds feature ``s mod g``. Horner
    with ``-1`` rotations, then one rotation per set bit of ``first`` (``-2^j`` keys).
    ``rotate`` is the backend's rotation (numpy or CKKS).
    """
    acc = q[-1]
    for i in range(len(q) - 2, -1, -1):
        acc = rotate(acc, -1) + q[i]
    return rotate_by(acc, first, -1, rotate)


def gradient_map(products: np.ndarray, layout: DiagonalLayout) -> np.ndarray:
    """Per-feature sums from folded backward products ``([parts,] groups, slots)`` -> (G*g,).

    Slot ``s`` of a folded product (:func:`fold_products`) holds a term of feature ``s mod g``;
    leading ``parts`` (one per worker) are summed. The map is linear, so the key holder applies
    it to masked values and the aggregator to the masks.
    """
    G, g, S = layout.n_groups, layout.group, layout.slots
    return np.asarray(products).reshape(-1, G, S // g, g).sum(axis=(0, 2)).reshape(-1)


def rotation_steps(group: int, baby: int) -> list[int]:
    """Galois steps the aggregator needs: ``+-1``, and ``+-baby * 2^j`` below the group width.

    Baby steps chain ``+1``, the fold chains ``-1``, Horner uses ``+-baby``, and a worker that
    owns giant steps ``start..`` (or baby steps ``first..``) shifts by ``baby * start`` (by
    ``-first``) with one rotation per set bit.
    """
    steps = {1} | {-(1 << j) for j in range(baby.bit_length() - 1)}
    j = baby
    while j < group:
        steps |= {j, -j}
        j *= 2
    return sorted(steps)


def weight_pattern(values: np.ndarray, layout: DiagonalLayout) -> np.ndarray:
    """(groups*g,) weights -> (groups, slots) pattern vectors ``W[s] = w[s mod g]``."""
    G, g, S = layout.n_groups, layout.group, layout.slots
    return np.tile(np.asarray(values, dtype=np.float64).reshape(G, g), (1, S // g))


def unpattern(vectors: np.ndarray, layout: DiagonalLayout) -> np.ndarray:
    """Inverse of :func:`weight_pattern` (mean over repeats, robust to CKKS noise)."""
    G, g, S = layout.n_groups, layout.group, layout.slots
    return np.asarray(vectors).reshape(G, S // g, g).mean(axis=1).reshape(-1)


def sum_packed(packs: Iterable[dict[int, DiagonalBlock]]) -> list[DiagonalBlock]:
    """Add hospitals' packed blocks slot-wise (what the aggregator does on ciphertexts)."""
    sums: dict[int, DiagonalBlock] = {}
    for pack in packs:
        for blk, b in pack.items():
            if blk in sums:
                sums[blk] = DiagonalBlock(
                    sums[blk].diagonals + b.diagonals,
                    sums[blk].mask + b.mask,
                    sums[blk].targets + b.targets,
                )
            else:
                sums[blk] = b
    return [sums[k] for k in sorted(sums)]
