"""The data-parallel part of an epoch: :class:`DiagonalCompute` runs one or more shares.

A compute holds the blocks, makes its share's weight rotations, runs the forward pass over its
(block, giant step) cells, forms the residuals of the blocks it owns and adds the backward
products of its (group, baby) units. In process it covers the whole epoch; on a Ray worker
(:mod:`medfed.scale.workers`) a part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from medfed.crypto.diagonal import (
    DiagonalLayout,
    baby_rotations,
    cell_steps,
    fold_products,
    rotate_by,
)
from medfed.train.diagonal.backend import Block, DiagonalBackend
from medfed.train.diagonal.claims import Claims
from medfed.train.diagonal.planner import Share
from medfed.train.poly import scaled_residual, target_term

EARLY_CELLS = 16  # forward cells started before waiting for other computes' rotations


@dataclass
class ShareState:
    """What a compute keeps of one share during an epoch."""

    w_rot: dict[int, list[dict]] = field(default_factory=dict)  # head -> [group] -> {b: rot}
    partial_z: dict[int, list] = field(default_factory=dict)  # block -> [head]: partial z
    residual: dict[int, list] = field(default_factory=dict)  # block -> [head] -> [a]: shifts
    sums: dict[int, dict] = field(default_factory=dict)  # head -> unit or "bias": product sums


class DiagonalCompute:
    """The data-parallel part of an epoch: one or more :class:`Share` objects (a worker's, or
    all of it).

    An epoch calls :meth:`rotate` (when rotations are shared), :meth:`forward`, then
    :meth:`residuals` and :meth:`backward` as
    :func:`~medfed.train.diagonal.planner.plan_tasks` says, for each share. Each returns what
    the other computes need (``{(head, group, b): rotation}``, ``{"z": ..., "r": ...}``,
    ``{"r": ...}``) and keeps the rest in the share's :class:`ShareState`.
    """

    def __init__(self, backend: DiagonalBackend, layout: DiagonalLayout) -> None:
        self.backend = backend
        self.layout = layout
        self.blocks: list[Block] = []
        self.states: dict[Share, ShareState] = {}

    @property
    def n_blocks(self) -> int:
        """How many blocks this compute holds."""
        return len(self.blocks)

    def kept(self, share: Share) -> ShareState:
        """What this compute keeps of ``share`` this epoch."""
        return self.states.setdefault(share, ShareState())

    def rotate(self, weights: list[list[object]], share: Share) -> dict[tuple, object]:
        """The share's baby-step rotations of its heads' weights (``share.chains``); returns
        them for the other computes when they are shared, as ``{(head, group, b): vector}``."""
        L, be = self.layout, self.backend
        st = self.kept(share)
        st.w_rot, mine = {}, {}
        for k in share.heads:
            st.w_rot[k] = [{0: weights[k][g]} for g in range(L.n_groups)]
            for g, lo, hi in share.chains:
                made = baby_rotations(weights[k][g], lo, hi, L.baby, L.group, be.rotate)
                st.w_rot[k][g].update(made)
                mine.update({(k, g, b): v for b, v in made.items()})
        return mine if share.exchange else {}

    def forward(
        self,
        weights,
        rotations,
        share: Share,
        biases: list,
        c: float,
        approx,
        blocks: tuple,
        board: Claims | None = None,
    ) -> dict:
        """One call: the weight rotations (unless ``weights`` is None: :meth:`rotate` ran), the
        forward pass, then the residuals of ``blocks``, owned blocks that need no other
        compute's partial ``z``. Returns ``{"z": partial z of blocks others own, "r": those
        residuals when they are shared}``."""
        if weights is not None:
            self.rotate(weights, share)
        z = self.forward_pass(rotations, share, board)
        r = self.residuals([], biases, c, approx, share, blocks)["r"] if blocks else {}
        return {"z": z, "r": r}

    def forward_pass(self, rotations, share: Share, board: Claims | None = None) -> dict:
        """Partial ``z`` (without bias) of the share's cells, per block and head, from the kept
        and the other computes' weight rotations; returns those of the blocks that other
        computes own.

        ``rotations``: the other computes' published rotations, or a function that waits for
        them. It is called only after the first cells' products with the rotations in hand
        (up to :data:`EARLY_CELLS` unrelinearized partial sums), so a compute does not wait
        while another finishes its rotations. Then the share's contested cells are taken from
        ``board`` one at a time until its neighbours have taken the rest.
        """
        L, be, A = self.layout, self.backend, self.layout.giant
        st = self.kept(share)
        st.partial_z, st.residual, st.sums = {}, {}, {}
        units = [(g, b) for g in range(L.n_groups) for b in range(L.baby)]

        def pairs(k, cell, which):
            d, w = self.blocks[cell // A].diagonals, st.w_rot[k]
            return [(d[g][cell % A][b], w[g][b]) for g, b in which]

        inner, early, rest = {}, {}, {}  # (head, cell) -> the cell's relinearized inner product
        cells = [  # each block's giant steps from the top (Horner order)
            (k, i * A + a)
            for k in share.heads
            for i, rng in _steps_by_block(share.cells, A, self.n_blocks)
            for a in reversed(rng)
        ]
        for k in share.heads:
            rest[k] = [(g, b) for g, b in units if b not in st.w_rot[k][g]]
        for k, cell in cells[:EARLY_CELLS] if any(rest.values()) else []:
            ready = [(g, b) for g, b in units if b in st.w_rot[k][g]]
            early[k, cell] = be.dot(pairs(k, cell, ready), rescale=False, relin=False)
        for other in rotations() if callable(rotations) else rotations:
            for (k, g, b), v in other.items():
                st.w_rot[k][g][b] = v
        for k, cell in cells:
            if (k, cell) in early:
                part = early.pop((k, cell)) + be.dot(pairs(k, cell, rest[k]), False, False)
                inner[k, cell] = be.rescale(be.relinearize(part))
            else:
                inner[k, cell] = be.dot(pairs(k, cell, units))
        mine = list(share.cells)
        for contest in share.contests if board is not None else ():
            while (cell := board.take(contest)) is not None:
                mine.append(cell)
                for k in share.heads:
                    inner[k, cell] = be.dot(pairs(k, cell, units))
        done = range(min(mine), max(mine) + 1) if mine else range(0)
        if len(done) != len(mine):
            raise RuntimeError(f"a share's forward cells must be contiguous, got {sorted(mine)}")
        for k in share.heads:
            for i, rng in _steps_by_block(done, A, self.n_blocks):
                z = None
                for a in reversed(rng):  # Horner over this share's giant steps of the block
                    cur = inner[k, i * A + a]
                    z = cur if z is None else cur + be.rotate(z, L.baby)
                st.partial_z.setdefault(i, []).append(rotate_by(z, rng.start, L.baby, be.rotate))
        return {i: z for i, z in st.partial_z.items() if i not in share.owned}

    def residuals(
        self, published: list[dict], biases: list, c: float, approx, share: Share, blocks: tuple
    ) -> dict:
        """Residuals of ``blocks`` (owned) from the kept and the other computes' partial ``z``
        (``published[m]["z"]``), with their giant-step shifts ``rot(r, -baby * a)``; returns
        ``{"r": them}`` for the other computes (those that share the heads)."""
        L, be = self.layout, self.backend
        st = self.kept(share)
        for i in blocks:
            blk, per_head = self.blocks[i], []
            for pos, k in enumerate(share.heads):
                z = st.partial_z[i][pos]
                for other in published:
                    if i in other["z"]:
                        z = z + other["z"][i][pos]
                key = ("target", k, c, approx.coeffs[0])
                if key not in blk.low:  # fresh y: the same level-0 product every epoch
                    blk.low[key] = target_term(blk.targets[k], approx, c)
                chain = [scaled_residual(z + biases[k], blk.targets[k], approx, c, blk.low[key])]
                for _ in range(1, L.giant):
                    chain.append(be.rotate(chain[-1], -L.baby))
                per_head.append(chain)
            st.residual[i] = per_head
        return {"r": {i: st.residual[i] for i in blocks} if share.exchange else {}}

    def backward(
        self, published: list[dict], share: Share, blocks: Sequence[int], last: bool
    ) -> dict | None:
        """Add the products of ``blocks`` (the share's ``(group, baby)`` units, and the bias
        products) to the running sums, from the kept or the other computes' shifted residuals
        (``published[m]["r"]``); the ``last`` call folds the sums and returns them finished by
        the backend (masked, serialized). Blocks are taken as their residuals arrive, so a
        compute that waits for another's residuals works on those it has."""
        be, blk = self.backend, self.blocks
        st = self.kept(share)
        merged = dict(st.residual)
        for other in published:
            for i, rs in other["r"].items():
                merged.setdefault(i, rs)
        owned = self._owned_units(share)
        for pos, k in enumerate(share.heads):
            sums = st.sums.setdefault(k, {})
            shifted = {i: merged[i][pos] for i in blocks}  # rot(r, -baby * a) per giant step a
            for g, babies in owned.items():
                for b in babies:
                    pairs = [
                        (_low(blk[i], (g, a, b), blk[i].diagonals[g][a][b], sr, be), sr)
                        for i, chain in shifted.items()
                        for a, sr in enumerate(chain)
                    ]
                    _add(sums, (g, b), be.dot(pairs, rescale=False, relin=False))
            if share.with_bias:
                pairs = [
                    (_low(blk[i], ("mask",), blk[i].mask, sr[0], be), sr[0])
                    for i, sr in shifted.items()
                ]
                _add(sums, "bias", be.dot(pairs, rescale=False, relin=False))
        if not last:
            return None
        q_all, qb_all = {}, {}
        for k in share.heads:
            sums = st.sums.pop(k)
            q_all[k] = {  # fold before the rescale: rotation noise shrinks with the rescale
                g: be.rescale(
                    fold_products(
                        [be.relinearize(sums[g, b]) for b in babies], babies[0], be.rotate
                    )
                )
                for g, babies in owned.items()
            }
            if share.with_bias:
                qb_all[k] = be.rescale(be.relinearize(sums["bias"]))
        return be.finish(q_all, qb_all)

    def _owned_units(self, share: Share) -> dict[int, list[int]]:
        owned: dict[int, list[int]] = {}
        for u in share.units:
            owned.setdefault(u // self.layout.baby, []).append(u % self.layout.baby)
        return owned


def _steps_by_block(cells: range, giant: int, n_blocks: int) -> list[tuple[int, range]]:
    """``(block, giant steps)`` of the blocks that ``cells`` touch."""
    found = [(i, cell_steps(cells, i, giant)) for i in range(n_blocks)]
    return [(i, rng) for i, rng in found if rng]


def _add(sums: dict, key, part) -> None:
    sums[key] = part if key not in sums else sums[key] + part


def _low(block: Block, key: tuple, v: object, like: object, backend: DiagonalBackend) -> object:
    """``v`` at the level of ``like``, cached in the block under ``key``."""
    if key not in block.low:
        block.low[key] = backend.lower(v, like)
    return block.low[key]
