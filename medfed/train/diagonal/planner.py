"""An epoch's work plan: who computes what (:class:`Share`), in which calls (:class:`Task`).

:func:`plan_shares` splits an epoch over computes (whole heads, left-over heads split by
blocks, or forward cells, backward units and weight rotations); :func:`plan_tasks` orders each
share's residual and backward calls; :func:`submission_order` submits them so that every call
comes after the calls it takes its inputs from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from medfed.crypto.diagonal import DiagonalLayout, cell_steps
from medfed.train.diagonal.claims import Contest


def split_range(total: int, parts: int) -> list[range]:
    """Contiguous, balanced ranges of ``range(total)``, one per worker."""
    parts = max(1, min(parts, total))
    edges = [round(i * total / parts) for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts)]


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
