"""Contested forward cells, and the claim boards that hand each out once, from either end.

Between two neighbouring shares of an epoch lies a :class:`Contest`: forward cells that either
share may compute. The left share takes them from the low end up, the right one from the top
down (:func:`next_cell`), so the faster compute takes more. :class:`ClaimBoard` is the
in-process board; :mod:`medfed.scale.node_claims` keeps the same spans in a file shared by the
workers of one node, and :class:`medfed.scale.workers.ClaimDesk` holds :class:`ClaimBoard`
objects in a Ray actor for pools spread over nodes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

EPOCHS_KEPT = 4  # boards of the latest epochs a shared board keeps (node claim file, ClaimDesk)


@dataclass(frozen=True)
class Contest:
    """Forward cells between two neighbouring shares that either takes, one at a time, as it
    gets to them: the faster compute takes more (a worker slowed by its host, or a slower node,
    does less). Never a block's giant step 0, so owners stay fixed."""

    key: int  # the boundary: the index of the left share
    cells: range
    rising: bool  # this share takes from the low end up (the left share), else from the top


class Claims(Protocol):
    """Anything that hands out contested cells: a :class:`ClaimBoard`, or one epoch's view of
    a board shared between processes (the node claim file, the ClaimDesk)."""

    def take(self, contest: Contest) -> int | None:
        """The next cell of ``contest`` from the caller's end, or None when none is left."""


def next_cell(low: int, high: int, rising: bool) -> tuple[int | None, int, int]:
    """One take from the open span ``[low, high)``: ``(cell, low, high)`` after it, ``cell``
    None when the span is empty. A rising taker takes from the low end up, the other from the
    top down; every claim board follows this."""
    if low >= high:
        return None, low, high
    if rising:
        return low, low + 1, high
    return high - 1, low, high - 1


class ClaimBoard:
    """One epoch's contested cells: :meth:`take` hands each out once, from either end."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex  # names this board on a remote ClaimDesk
        self.open: dict[int, list[int]] = {}  # contest key -> [next low cell, one past the high]

    def take(self, contest: Contest) -> int | None:
        """The next cell of ``contest`` from the caller's end, or None when none is left."""
        span = self.open.setdefault(contest.key, [contest.cells.start, contest.cells.stop])
        cell, span[0], span[1] = next_cell(span[0], span[1], contest.rising)
        return cell
