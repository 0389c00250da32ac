"""Head training in the diagonal layout: one loop, numpy or CKKS backend.

See :mod:`medfed.crypto.diagonal` for the layout. One epoch (full-batch gradient step)::

    Wb    = rot(W, b)                    b < baby            (chained +1 rotations)
    inner = sum_{g, b} D[g, a, b] * Wb   per giant step a    (one relinearization per sum)
    z     = inner_0 + rot(inner_1 + rot(inner_2 + ...))       (Horner, +baby rotations)
    r     = c * (sigmoid_approx(z + bias) - y)
    Q[g, b] = sum_{blocks, a} D[g, a, b] * rot(r, -baby * a)
    F[g]  = sum_b rot(Q[g, b], -b)                             (Horner, -1 rotations)
    Qb    = sum_blocks mask * r
    W, bias -= key_holder_sums(F, Qb)                         (one masked-sum round)

The plaintext reference (``PlainDiagonalBackend``) executes exactly this on numpy vectors.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from medfed.crypto.diagonal import (
    DiagonalLayout,
    baby_rotations,
    cell_steps,
    fold_products,
    gradient_map,
    rot,
    rotate_by,
    rotation_steps,
    unpattern,
    weight_pattern,
)
from medfed.crypto.masking import draw_mask
from medfed.train.head import HeadSchedule
from medfed.train.poly import scaled_residual, target_term


@dataclass
class Block:
    """One block of uploaded (encrypted or plain) vectors, summed over hospitals."""

    diagonals: list  # [group][giant][baby] -> vector
    mask: object
    targets: list  # [head] -> vector
    low: dict = field(default_factory=dict)  # cached level-lowered copies and target terms


class DiagonalBackend(Protocol):
    def zeros(self) -> object: ...

    def dot(
        self, pairs: Sequence[tuple[object, object]], rescale: bool = True, relin: bool = True
    ) -> object: ...

    def relinearize(self, v: object) -> object: ...

    def rescale(self, v: object) -> object: ...

    def rotate(self, v: object, step: int) -> object: ...

    def lower(self, v: object, like: object) -> object:
        """``v`` at the level of ``like`` (identity for numpy)."""

    def finish(self, q: dict, qb: dict) -> dict:
        """A compute's folded products (``{head: {group: vector}}``, bias products
        ``{head: vector}``) ready to leave it."""

    def sum_round(
        self, parts: list[dict], step: int, weights: list | None = None, decay: float = 0.0
    ) -> tuple[list, list]:
        """Weight and bias updates from every compute's finished products, the weight updates
        including ``decay * weights`` (the L2 penalty) when ``weights`` are given."""


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


def _low(block: Block, key: tuple, v: object, like: object, backend: DiagonalBackend) -> object:
    if key not in block.low:
        block.low[key] = backend.lower(v, like)
    return block.low[key]


EARLY_CELLS = 16  # forward cells started before waiting for other computes' rotations


def split_range(total: int, parts: int) -> list[range]:
    """Contiguous, balanced ranges of ``range(total)``, one per worker."""
    parts = max(1, min(parts, total))
    edges = [round(i * total / parts) for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts)]


@dataclass(frozen=True)
class Contest:
    """Forward cells between two neighbouring shares that either takes, one at a time, as it
    gets to them: the faster compute takes more (a worker slowed by its host, or a slower node,
    does less). Never a block's giant step 0, so owners stay fixed."""

    key: int  # the boundary: the index of the left share
    cells: range
    rising: bool  # this share takes from the low end up (the left share), else from the top


@dataclass(frozen=True)
class Share:
    """One compute's part of an epoch."""

    heads: range  # the heads it trains
    cells: range  # forward (block, giant step) cells ``i * giant + a`` it always computes
    units: range  # backward (group, baby) units ``g * baby + b``
    with_bias: bool  # it computes the bias products of its heads
    owned: tuple[int, ...]  # blocks whose residuals it forms (it holds their giant step 0)
    exchange: bool  # weight rotations, partial z and residuals go to and from the others
    chains: tuple[tuple[int, int, int], ...] = ()  # (group, lo, hi): the rot(W, lo..hi) it makes
    contests: tuple[Contest, ...] = ()  # cells it may take besides ``cells``
    compute: int = 0  # the compute that runs it (a compute may run several shares)

    @property
    def reach(self) -> range:
        """Every forward cell this share may compute (its cells and its contests')."""
        ranges = [self.cells, *(c.cells for c in self.contests)]
        return range(min(r.start for r in ranges), max(r.stop for r in ranges))


def plan_shares(layout: DiagonalLayout, parts: int, n_blocks: int) -> list[Share]:
    """Split an epoch over ``parts`` computes.

    With enough heads (one-vs-rest), each compute trains whole heads: nothing is repeated and
    nothing is exchanged. Heads left over by an even split (7 heads on 2 computes: 3 + 3 and
    one) are each split by blocks, one share per compute: every compute then makes the head's
    weight rotations and folds its products, and the masked-sum round adds the parts.
    Otherwise every compute works on every head: the weights' baby-step
    rotations split by ``(group, baby)``, the forward pass by (block, giant step) cells, each
    block's residuals (and their shifts) formed by one compute, the backward pass by
    ``(group, baby)`` units; rotations, partial z and shifted residuals are exchanged
    (uncompressed: cheaper than computing them again). A block's residuals are formed by the
    compute that holds its giant step 0: that part needs no shift rotation, so its compute
    tends to finish its forward pass first.
    """
    H, A, G, B = layout.n_heads, layout.giant, layout.n_groups, layout.baby
    cells_all, units_all = range(n_blocks * A), range(G * B)
    k = max(1, min(parts, len(cells_all), len(units_all)))
    every = tuple(range(n_blocks))
    whole = tuple((g, 1, B - 1) for g in range(G)) if B > 1 else ()
    if k > 1 and H >= k and (H % k == 0 or H >= 2 * k):
        spare = H % k if n_blocks > 1 else 0  # heads left over by an even split
        even = [
            Share(h, cells_all, units_all, True, every, False, whole, compute=j)
            for j, h in enumerate(split_range(H - spare, k))
        ]
        return even + [  # each left-over head split by blocks: only its folds are repeated
            Share(
                range(h, h + 1),
                range(b.start * A, b.stop * A),
                units_all,
                True,
                tuple(b),
                False,
                whole,
                compute=j,
            )
            for h in range(H - spare, H)
            for j, b in enumerate(split_range(n_blocks, k))
        ]
    cells = split_range(len(cells_all), k)
    contested = [contested_cells(cells[j], cells[j + 1], A) for j in range(len(cells) - 1)]
    contests: list[list[Contest]] = [[] for _ in cells]
    for j, rng in enumerate(contested):
        if rng:
            contests[j].append(Contest(j, rng, True))
            contests[j + 1].append(Contest(j, rng, False))
    fixed = [
        range(
            max([c.start, *(t.cells.stop for t in contests[j] if not t.rising)]),
            min([c.stop, *(t.cells.start for t in contests[j] if t.rising)]),
        )
        for j, c in enumerate(cells)
    ]
    owner = {i: j for j, c in enumerate(fixed) for i in every if i * A in c}
    units = split_range(len(units_all), len(cells))
    chains = plan_chains(G, B, len(cells)) if len(cells) > 1 else [whole]
    return [
        Share(
            range(H),
            c,
            u,
            j == 0,
            tuple(i for i in every if owner[i] == j),
            len(cells) > 1,
            ch,
            tuple(contests[j]),
            compute=j,
        )
        for j, (c, u, ch) in enumerate(zip(fixed, units, chains, strict=True))
    ]


def contested_cells(left: range, right: range, giant: int) -> range:
    """The cells around the boundary of two neighbouring shares that either may take: up to
    half a block on each side, at most half of either share's cells minus one (so each keeps
    one, and a share's two contests never meet), and no giant step 0 (owners stay fixed)."""
    b = right.start
    lo = max(b - giant // 2, b - (len(left) - 1) // 2)
    hi = min(b + giant // 2, b + (len(right) - 1) // 2)
    if b % giant:  # the boundary's block, after its giant step 0
        lo, hi = max(lo, b - b % giant + 1), min(hi, b - b % giant + giant)
    else:  # the block before the boundary, after its giant step 0
        lo, hi = max(lo, b - giant + 1), min(hi, b)
    return range(lo, hi) if hi - lo > 1 else range(0)


def plan_chains(n_groups: int, baby: int, parts: int) -> list[tuple[tuple[int, int, int], ...]]:
    """The weights' baby-step rotations ``(group, b)``, ``1 <= b < baby``, in ``parts``
    contiguous runs, as ``(group, lo, hi)`` chains per part (a part may get none)."""
    units = [(g, b) for g in range(n_groups) for b in range(1, baby)]
    out = []
    for rng in split_range(len(units), parts) if units else [range(0)] * parts:
        chains: dict[int, list[int]] = {}
        for g, b in (units[i] for i in rng):
            chains.setdefault(g, []).append(b)
        out.append(tuple((g, bs[0], bs[-1]) for g, bs in chains.items()))
    out += [()] * (parts - len(out))
    return out


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
    :meth:`residuals` and :meth:`backward` as :func:`plan_tasks` says, for each share. Each
    returns what the other computes need (``{(head, group, b): rotation}``,
    ``{"z": ..., "r": ...}``, ``{"r": ...}``) and keeps the rest in the share's
    :class:`ShareState`.
    """

    def __init__(self, backend: DiagonalBackend, layout: DiagonalLayout) -> None:
        self.backend = backend
        self.layout = layout
        self.blocks: list[Block] = []
        self.states: dict[Share, ShareState] = {}

    @property
    def n_blocks(self) -> int:
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
        board: ClaimBoard | None = None,
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

    def forward_pass(self, rotations, share: Share, board: ClaimBoard | None = None) -> dict:
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


class ClaimBoard:
    """One epoch's contested cells: :meth:`take` hands each out once, from either end."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex  # names this board on a remote ClaimDesk
        self.open: dict[int, list[int]] = {}  # contest key -> [next low cell, one past the high]

    def take(self, contest: Contest) -> int | None:
        """The next cell of ``contest`` from the caller's end, or None when none is left."""
        span = self.open.setdefault(contest.key, [contest.cells.start, contest.cells.stop])
        if span[0] >= span[1]:
            return None
        if contest.rising:
            span[0] += 1
            return span[0] - 1
        span[1] -= 1
        return span[1]


def _add(sums: dict, key, part) -> None:
    sums[key] = part if key not in sums else sums[key] + part


def _residual_tasks(shares: list[Share], j: int, giant: int) -> list[tuple[tuple, tuple]]:
    """Share ``j``'s owned blocks, grouped by the other shares whose partial ``z`` they need.

    Blocks that need no other share come first, so a compute forms those residuals while it
    waits for the others' forward passes.
    """
    share = shares[j]
    if not share.exchange:
        return [(share.owned, ())]

    tasks: dict[tuple, list[int]] = {}
    for i in share.owned:
        sources = tuple(m for m, o in enumerate(shares) if m != j and cell_steps(o.reach, i, giant))
        tasks.setdefault(sources, []).append(i)
    ordered = sorted(tasks.items(), key=lambda item: len(item[0]))
    return [(tuple(blocks), src) for src, blocks in ordered]


@dataclass(frozen=True)
class Task:
    """One call on a compute after its forward pass (or, ``fused``, part of it)."""

    method: str  # "residuals" or "backward"
    blocks: tuple[int, ...]
    sources: tuple[int, ...] = ()  # residuals: the shares whose partial z they need
    inputs: tuple[tuple[int, tuple[int, ...]], ...] = ()  # backward: (share, blocks) residuals
    fused: bool = False  # residuals formed in the forward call (they need no other share)
    last: bool = False  # backward: fold and return the sums


def plan_tasks(shares: list[Share], giant: int) -> list[list[Task]]:
    """Each share's calls, in order: its residuals, each followed by those blocks' backward
    products, then the backward products of the blocks other shares publish (in the order they
    are formed). A compute waiting for residuals thus works on the ones it has.

    Residuals that need no other share's partial ``z`` are formed in the forward call
    (``fused``), and the products of blocks whose residuals come from such a call join the
    backward call before them: those residuals are ready when every forward pass is. Fewer
    calls, fewer round trips through Ray.
    """
    plans: list[list[Task]] = []
    for j in range(len(shares)):
        tasks = []
        for blocks, src in _residual_tasks(shares, j, giant):
            residuals = Task("residuals", blocks, src, fused=not src)
            tasks += [residuals, Task("backward", blocks)]
        plans.append(tasks)
    published = sorted(
        (t, m)
        for m, tasks in enumerate(plans)
        for t, task in enumerate(tasks)
        if task.method == "residuals" and shares[m].exchange
    )
    fused = {(m, task.blocks) for m, tasks in enumerate(plans) for task in tasks if task.fused}
    for j, tasks in enumerate(plans):
        if shares[j].exchange:
            tasks += [
                Task("backward", plans[m][t].blocks, inputs=((m, plans[m][t].blocks),))
                for t, m in published
                if m != j
            ]
        merged: list[Task] = []
        for task in tasks:
            prev = merged[-1] if merged else None
            if (
                task.method == "backward"
                and prev is not None
                and prev.method == "backward"
                and all(key in fused for key in task.inputs)
            ):
                merged[-1] = replace(
                    prev, blocks=prev.blocks + task.blocks, inputs=prev.inputs + task.inputs
                )
            else:
                merged.append(task)
        merged[-1] = replace(merged[-1], last=True)
        plans[j] = merged
    return plans


def submission_order(plans: list[list[Task]]) -> list[tuple[int, int]]:
    """``(share, task)`` pairs, each after the residuals tasks it takes its inputs from."""
    where = {
        (m, task.blocks): t
        for m, tasks in enumerate(plans)
        for t, task in enumerate(tasks)
        if task.method == "residuals"
    }
    cursor, order = [0] * len(plans), []
    while len(order) < sum(map(len, plans)):
        before = len(order)
        for j, tasks in enumerate(plans):
            while cursor[j] < len(tasks):
                if any(cursor[m] <= where[m, blocks] for m, blocks in tasks[cursor[j]].inputs):
                    break
                order.append((j, cursor[j]))
                cursor[j] += 1
        if len(order) == before:
            raise RuntimeError("the epoch's task plan has a dependency cycle")
    return order


def diagonal_epoch(
    backend: DiagonalBackend,
    computes: Sequence,
    weights: list[list[object]],
    biases: list[object],
    layout: DiagonalLayout,
    schedule: HeadSchedule,
    step: int,
) -> tuple[list[list[object]], list[object]]:
    """One full-batch gradient step over computes that each own a share of the work.

    ``computes`` are :class:`DiagonalCompute` objects, or proxies of remote ones (Ray actors)
    with ``submit_rotate``/``submit_forward``/``submit_residuals``/``submit_backward`` returning
    handles (:func:`plan_tasks` says which calls each compute gets). Weight rotations, partial
    ``z`` and residuals go from compute to compute without a stop at the driver (remote handles
    pass object references).
    """
    c, approx = schedule.lr / layout.n_padded, schedule.approx
    shares = plan_shares(layout, len(computes), computes[0].n_blocks)
    plans = plan_tasks(shares, layout.giant)
    comps = [computes[sh.compute] for sh in shares]
    board = ClaimBoard() if any(sh.contests for sh in shares) else None
    rotated = {  # shared rotations go out first; a share that shares none rotates in forward
        j: submit(comp, "rotate", weights, sh).share()
        for j, (comp, sh) in enumerate(zip(comps, shares, strict=True))
        if sh.exchange
    }
    fwd = []
    for j, (comp, sh) in enumerate(zip(comps, shares, strict=True)):
        others = [r for m, r in rotated.items() if m != j]
        fused = next((t.blocks for t in plans[j] if t.fused), ())
        own = None if sh.exchange else weights
        fwd.append(
            submit(comp, "forward", own, others, sh, biases, c, approx, fused, board).share()
        )
    published, backward = {}, []
    for j, t in submission_order(plans):
        task, comp, sh = plans[j][t], comps[j], shares[j]
        if task.method == "residuals":
            if task.fused:  # formed by the forward call, published with its partial z
                published[j, task.blocks] = fwd[j]
                continue
            src = [fwd[m] for m in task.sources]
            handle = submit(comp, "residuals", src, biases, c, approx, sh, task.blocks)
            published[j, task.blocks] = handle.share()
        else:
            inputs = [published[key] for key in task.inputs]
            backward.append(submit(comp, "backward", inputs, sh, task.blocks, task.last))
    parts = [p for p in (h.result() for h in backward) if p is not None]  # raises any failure
    decayed = weights if schedule.decay else None
    upd_w, upd_b = backend.sum_round(parts, step, decayed, schedule.decay)
    new_w = [
        [w - u for w, u in zip(wk, uk, strict=True)] for wk, uk in zip(weights, upd_w, strict=True)
    ]
    new_b = [b - u for b, u in zip(biases, upd_b, strict=True)]
    return new_w, new_b


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value

    share = result  # what other computes receive: the value itself


def submit(compute, method: str, *args):
    """Start ``method`` on a compute: remote proxies run in parallel, local ones right away."""
    remote = getattr(compute, f"submit_{method}", None)
    if remote is not None:
        return remote(*args)
    return _Done(getattr(compute, method)(*args))


def train_diagonal(
    backend: DiagonalBackend,
    computes: Sequence,
    layout: DiagonalLayout,
    schedule: HeadSchedule,
    on_step: Callable[[int], None] | None = None,
) -> tuple[list[list[object]], list[object]]:
    """Train from zero weights (every compute holds the blocks' targets)."""
    weights = [[backend.zeros() for _ in range(layout.n_groups)] for _ in range(layout.n_heads)]
    biases = [backend.zeros() for _ in range(layout.n_heads)]
    for step in range(schedule.epochs):
        weights, biases = diagonal_epoch(backend, computes, weights, biases, layout, schedule, step)
        if on_step is not None:
            on_step(step)
    return weights, biases


def keyholder_sums(
    q: np.ndarray,
    qb: np.ndarray,
    layout: DiagonalLayout,
    weights: np.ndarray | None = None,
    decay: float = 0.0,
) -> tuple:
    """Plain linear map from (masked) products to pattern updates: what a hospital computes.

    ``weights``: the (masked) weight patterns ``(groups, slots)``; ``decay * weights`` (the L2
    penalty's step) is added to the weight updates.
    """
    grads = gradient_map(q, layout)
    pattern = weight_pattern(grads, layout)
    if weights is not None:
        pattern = pattern + decay * np.asarray(weights)
    return pattern, np.full(layout.slots, float(np.sum(qb)))


class PlainDiagonalBackend:
    """numpy slot vectors: the plaintext reference of the encrypted diagonal path."""

    def __init__(self, layout: DiagonalLayout) -> None:
        self.layout = layout

    def zeros(self) -> np.ndarray:
        return np.zeros(self.layout.slots)

    def dot(self, pairs, rescale=True, relin=True):
        return sum(a * b for a, b in pairs)

    def relinearize(self, v):
        return v

    def rescale(self, v):
        return v

    def rotate(self, v, step):
        return rot(v, step)

    def lower(self, v, like):
        return v

    def finish(self, q, qb):
        return {"q": q, "qb": qb}

    def sum_round(self, parts, step, weights=None, decay=0.0):
        L = self.layout
        upd_w, upd_b = [], []
        for k in range(L.n_heads):
            q = np.stack([sum(_of_group(parts, k, g)) for g in range(L.n_groups)])
            wk = np.stack(weights[k]) if weights is not None else None
            pattern, bias = keyholder_sums(q, sum(_bias_products(parts, k)), L, wk, decay)
            upd_w.append(list(pattern))
            upd_b.append(bias)
        return upd_w, upd_b


def _of_group(parts: list[dict], k: int, g: int) -> list:
    """Every compute's (masked) folded product of head ``k``, group ``g``."""
    found = [p["q"][k][g] for p in parts if g in p["q"].get(k, {})]
    if not found:
        raise ValueError(f"no compute returned the products of head {k}, group {g}")
    return found


def _bias_products(parts: list[dict], k: int) -> list:
    """Every compute's (masked) bias product of head ``k`` (one per share that has blocks of
    the head)."""
    found = [p["qb"][k] for p in parts if k in p["qb"]]
    if not found:
        raise ValueError(f"no compute returned the bias product of head {k}")
    return found


def head_matrix(weights: list[list[np.ndarray]], biases: list[np.ndarray], layout) -> np.ndarray:
    """Decrypted/plain pattern vectors -> ``(d + 1, heads)`` matrix (bias row last)."""
    cols = []
    for wk, bk in zip(weights, biases, strict=True):
        w = unpattern(np.stack([np.asarray(v) for v in wk]), layout)[: layout.n_features]
        cols.append(np.concatenate([w, [float(np.mean(np.asarray(bk)))]]))
    return np.stack(cols, axis=1)


class EncryptedDiagonalBackend:
    """The aggregator's CKKS backend: public key, relinearization and Galois keys (no secret)."""

    def __init__(self, engine, layout: DiagonalLayout, keyholder, mask_bits: int, rng=None):
        from medfed.crypto.masking import mask_rng

        if engine.private:
            raise ValueError("the aggregator's backend must be built on a public context")
        self.engine = engine
        self.layout = layout
        self.keyholder = keyholder
        self.mask_bits = mask_bits
        self.rng = rng if rng is not None else mask_rng()
        self.records: list[dict] = []

    def zeros(self):
        return self.engine.encrypt(np.zeros(self.layout.slots))

    def dot(self, pairs, rescale=True, relin=True):
        return self.engine.dot(pairs, rescale, relin)

    def relinearize(self, v):
        return self.engine.relinearize(v)

    def rescale(self, v):
        from medfed.crypto.seal import SealVec

        return SealVec(self.engine, self.engine.rescale(v.ct))

    def rotate(self, v, step):
        return self.engine.rotate(v, step)

    def lower(self, v, like):
        return self.engine.mod_switch_to_level(v, like.level)

    def finish(self, q, qb):
        """Mask and serialize products where they were computed (a worker, or in-process).

        Returns the masked bytes (``{head: {group: bytes}}``, bias ``{head: bytes}``) and the
        masks' images under the key holder's linear map, so no unmasked product leaves the
        compute.
        """
        L, S, e = self.layout, self.layout.slots, self.engine
        out = {"q": {}, "qb": {}, "mask_pattern": {}, "mask_bias": {}}
        for k, per_group in q.items():
            masks = np.zeros((L.n_groups, S))
            for g in per_group:
                masks[g] = draw_mask(self.rng, S, self.mask_bits)
            out["q"][k] = {g: e.to_bytes(v + masks[g]) for g, v in per_group.items()}
            out["mask_pattern"][k] = weight_pattern(gradient_map(masks, L), L)
        for k, v in qb.items():
            m = draw_mask(self.rng, S, self.mask_bits)
            out["qb"][k] = e.to_bytes(v + m)
            out["mask_bias"][k] = float(m.sum())
        return out

    def _group_sum(self, parts: list, k: int, g: int) -> bytes:
        """One masked vector per group: computes that share a group are added here."""
        return self._masked_sum(_of_group(parts, k, g), f"masked products {k}/{g}")

    def _masked_sum(self, blobs: list, item: str) -> bytes:
        if len(blobs) == 1:
            return blobs[0]
        e = self.engine
        total = None
        for b in blobs:
            v = e.from_bytes(b, sender="worker", item=item)
            total = v if total is None else total + v
        return e.to_bytes(total)

    def sum_round(self, parts, step, weights=None, decay=0.0):
        """The masked-sum round: masked products (and, with an L2 penalty, masked weights) go
        to a key-holding hospital, whose encrypted linear map of them, less the masks' images,
        is the update."""
        import time

        from medfed.crypto.context import CiphertextError

        t0 = time.perf_counter()
        L, e, S = self.layout, self.engine, self.layout.slots
        masked, weight_masks = [], {}
        for k in range(L.n_heads):
            masked.extend(self._group_sum(parts, k, g) for g in range(L.n_groups))
            masked.append(self._masked_sum(_bias_products(parts, k), f"masked bias {k}"))
        if weights is not None:  # after every product vector: the key holder's layout
            for k in range(L.n_heads):
                weight_masks[k] = [draw_mask(self.rng, S, self.mask_bits) for _ in weights[k]]
                masked.extend(
                    e.to_bytes(w + m) for w, m in zip(weights[k], weight_masks[k], strict=True)
                )
        per_head = L.n_groups + 1
        while True:  # a key holder whose reply is unusable is dropped; the next one retries
            replies, who = self.keyholder.sum_masked(masked, step, decay if weights else 0.0)
            try:
                if len(replies) != per_head * L.n_heads:
                    raise CiphertextError(
                        f"{who} returned {len(replies)} sums in the masked-sum round, expected "
                        f"{per_head * L.n_heads}; it must answer with one per masked vector group"
                    )
                loaded = [
                    e.from_bytes(r, sender=who, item=f"sum {j // per_head}/{j % per_head}")
                    for j, r in enumerate(replies)
                ]
                break
            except CiphertextError as err:
                reject = getattr(self.keyholder, "reject", None)
                if reject is None:
                    raise
                reject(who, str(err), step)
        upd_w, upd_b = [], []
        for k in range(L.n_heads):
            pattern = sum(p["mask_pattern"][k] for p in parts if k in p["mask_pattern"])
            if k in weight_masks:
                pattern = pattern + decay * np.stack(weight_masks[k])
            bias = np.full(L.slots, sum(p["mask_bias"][k] for p in parts if k in p["mask_bias"]))
            got = loaded[k * per_head : (k + 1) * per_head]
            upd_w.append([gv - p for gv, p in zip(got[:-1], pattern, strict=True)])
            upd_b.append(got[-1] - bias)
        self.records.append(
            {
                "step": step,
                "hospital": who,
                "bytes_to_hospital": sum(len(b) for b in masked),
                "bytes_from_hospital": sum(len(b) for b in replies),
                "seconds": time.perf_counter() - t0,
            }
        )
        return upd_w, upd_b


def hospital_sums(
    engine, masked: list[bytes], layout: DiagonalLayout, mask_bits: int, decay: float = 0.0
) -> list[bytes]:
    """The key holder's side of the round: decrypt masked products, sum, re-encrypt.

    Per head the aggregator sends one masked (folded) product vector per group and one masked
    bias vector; with an L2 penalty (``decay > 0``) then, per head, the masked weight pattern
    of each group. The reply is one pattern ciphertext per group and one replicated bias
    ciphertext per head.
    """
    from medfed.crypto.context import CiphertextError

    H, G = layout.n_heads, layout.n_groups
    per_head = G + 1
    expected = per_head * H + (G * H if decay else 0)
    if not 0 <= decay < 1:
        raise CiphertextError(f"the aggregator asked for a weight decay of {decay}, not in [0, 1)")
    if len(masked) != expected:
        raise CiphertextError(
            f"the aggregator sent {len(masked)} masked vectors; expected {G} group products "
            f"plus one bias vector per head ({H} heads)"
            + (f", and {G} weight patterns per head" if decay else "")
            + f": {expected}"
        )
    bound = 2.0 ** (mask_bits + 3)

    def opened(blobs: list[bytes], what: str) -> np.ndarray:
        values = np.stack(
            [
                engine.decrypt(engine.from_bytes(b, sender="aggregator", item=f"{what}/{i}"))
                for i, b in enumerate(blobs)
            ]
        )
        if not np.all(np.isfinite(values)) or np.abs(values).max() > bound:
            raise CiphertextError(
                "masked values from the aggregator decrypt outside the mask range: not "
                "encrypted under this consortium's key, or corrupt."
            )
        return values

    out = []
    for k in range(H):
        values = opened(masked[k * per_head : (k + 1) * per_head], f"masked {k}")
        weights = None
        if decay:
            start = per_head * H + k * G
            weights = opened(masked[start : start + G], f"masked weights {k}")
        pattern, bias = keyholder_sums(values[:-1], values[-1], layout, weights, decay)
        out.extend(engine.encrypt_bytes(p) for p in pattern)
        out.append(engine.encrypt_bytes(bias))
    return out


def galois_steps(layout: DiagonalLayout) -> list[int]:
    """The only rotations the aggregator needs keys for; all others are chained from these."""
    return rotation_steps(layout.group, layout.baby)
