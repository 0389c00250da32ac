"""What an epoch computes on: the backend protocol and the uploaded blocks.

A backend (:class:`DiagonalBackend`) supplies the vector arithmetic (numpy in
:mod:`~medfed.train.diagonal.plain`, CKKS in :mod:`~medfed.train.diagonal.encrypted`) and the
masked-sum round that turns every compute's products into updates. A :class:`Block` is one
block of the layout, summed over hospitals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from medfed.crypto.diagonal import DiagonalLayout


@dataclass
class Block:
    """One block of uploaded (encrypted or plain) vectors, summed over hospitals."""

    diagonals: list  # [group][giant][baby] -> vector
    mask: object
    targets: list  # [head] -> vector
    low: dict = field(default_factory=dict)  # cached level-lowered copies and target terms


class DiagonalBackend(Protocol):
    """The vector arithmetic of an epoch and its masked-sum round (numpy or CKKS)."""

    def zeros(self) -> object:
        """A vector of zeros (the starting weights and biases)."""

    def dot(
        self, pairs: Sequence[tuple[object, object]], rescale: bool = True, relin: bool = True
    ) -> object:
        """The sum of the products of ``pairs``, relinearized and rescaled unless told not to."""

    def relinearize(self, v: object) -> object:
        """``v`` relinearized (identity for numpy)."""

    def rescale(self, v: object) -> object:
        """``v`` rescaled (identity for numpy)."""

    def rotate(self, v: object, step: int) -> object:
        """``v`` rotated by ``step`` slots."""

    def lower(self, v: object, like: object) -> object:
        """``v`` at the level of ``like`` (identity for numpy)."""

    def finish(self, q: dict, qb: dict) -> dict:
        """A compute's folded products (``{head: {group: vector}}``, bias products
        ``{head: vector}``) ready to leave it."""

    def sum_round(
        self,
        parts: list[dict],
        step: int,
        weights: list | None = None,
        decay: float = 0.0,
        biases: list | None = None,
    ) -> tuple[list, list]:
        """Weight and bias updates from every compute's finished products, the weight updates
        including ``decay * weights`` (the L2 penalty) when ``weights`` are given, the bias
        updates ``decay * biases`` when ``biases`` are."""


def blocks_from_packed(packed, layout: DiagonalLayout, to_vec=None) -> list[Block]:
    """Training blocks from packed plaintext blocks; ``to_vec`` encrypts (identity: plaintext)."""
    to_vec = to_vec if to_vec is not None else (lambda v: v)
    G, A, B = layout.n_groups, layout.giant, layout.baby
    return [
        Block(
            [
                [[to_vec(b.diagonals[g, a, bb]) for bb in range(B)] for a in range(A)]
                for g in range(G)
            ],
            to_vec(b.mask),
            [to_vec(t) for t in b.targets],
        )
        for b in packed
    ]


class BlockSums:
    """Hospitals' uploaded blocks, added as they arrive (the aggregator never holds every
    hospital's ciphertexts at once); :meth:`blocks` gives the summed training blocks."""

    def __init__(self) -> None:
        self._sums: dict[int, tuple[list, object, list]] = {}

    def add(self, block: int, features: list, mask, targets: list) -> None:
        """Add one hospital's block ``block``: its flat diagonals, mask and per-head targets."""
        if block not in self._sums:
            self._sums[block] = (list(features), mask, list(targets))
            return
        x, m, y = self._sums[block]
        self._sums[block] = (
            [a + b for a, b in zip(x, features, strict=True)],
            m + mask,
            [a + b for a, b in zip(y, targets, strict=True)],
        )

    def blocks(self, layout: DiagonalLayout) -> list[Block]:
        """The summed blocks in block order, diagonals nested ``[group][giant][baby]``."""
        G, A, B = layout.n_groups, layout.giant, layout.baby
        out = []
        for blk in sorted(self._sums):
            x, m, y = self._sums[blk]
            diagonals = [
                [[x[(g * A + a) * B + b] for b in range(B)] for a in range(A)] for g in range(G)
            ]
            out.append(Block(diagonals, m, y))
        return out


def decay_share(layout: DiagonalLayout, weights, decay: float) -> float:
    """The multiple of a group's weight pattern that joins its products for the L2 penalty:
    ``decay * g / S``, which the key holder's sum over the ``S / g`` repeats turns into
    ``decay * w`` (0 without weights or decay). Both backends use it, so they agree."""
    return decay * layout.group / layout.slots if weights is not None and decay else 0.0


def bias_decay_share(layout: DiagonalLayout, biases, decay: float) -> float:
    """The multiple of a (replicated) bias vector that joins its products for the L2 penalty:
    ``decay / S``, which the key holder's sum over all ``S`` slots turns into ``decay * b``
    (0 without biases or decay)."""
    return decay / layout.slots if biases is not None and decay else 0.0


def group_products(parts: list[dict], k: int, g: int) -> list:
    """Every compute's (masked) folded product of head ``k``, group ``g``."""
    found = [p["q"][k][g] for p in parts if g in p["q"].get(k, {})]
    if not found:
        raise ValueError(f"no compute returned the products of head {k}, group {g}")
    return found


def bias_products(parts: list[dict], k: int) -> list:
    """Every compute's (masked) bias product of head ``k`` (one per share that has blocks of
    the head)."""
    found = [p["qb"][k] for p in parts if k in p["qb"]]
    if not found:
        raise ValueError(f"no compute returned the bias product of head {k}")
    return found
