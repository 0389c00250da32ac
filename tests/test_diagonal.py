"""The diagonal slot layout and its training loop against obviously-correct numpy code."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.crypto.diagonal import (
    baby_rotations,
    fold_products,
    gradient_map,
    pack_diagonal,
    plan_diagonal,
    rot,
    sum_packed,
    unpattern,
    weight_pattern,
)
from medfed.crypto.packing import LayoutError, n_buckets
from medfed.train.diagonal.backend import blocks_from_packed
from medfed.train.diagonal.claims import ClaimBoard
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.epoch import head_matrix, train_diagonal
from medfed.train.diagonal.plain import PlainDiagonalBackend
from medfed.train.diagonal.planner import plan_shares, plan_tasks, split_range, submission_order
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid


def _sum_blocks(data, layout):
    return sum_packed(pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(data))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 150), min_size=1, max_size=4),
    d=st.integers(2, 70),
    seed=st.integers(0, 10),
)
def test_forward_and_backward_maps_match_matrix_products(sizes, d, seed):
    rng = np.random.default_rng(seed)
    layout = plan_diagonal(
        [n_buckets(s, 16) for s in sizes], slots=256, n_classes=2, bucket=16, n_features=d
    )
    data = [(rng.normal(size=(s, d)), rng.integers(0, 2, s)) for s in sizes]
    blocks = _sum_blocks(data, layout)
    x = np.vstack([a for a, _ in data])
    w = np.zeros(layout.n_groups * layout.group)
    w[:d] = rng.normal(size=d)
    pattern = weight_pattern(w, layout)
    z_all, r_all = [], rng.normal(size=len(x))
    q = np.zeros((layout.n_groups, layout.giant, layout.baby, layout.slots))
    used = 0
    for b in blocks:
        z = np.zeros(layout.slots)
        for a in range(layout.giant):
            inner = sum(
                b.diagonals[g, a, bb] * rot(pattern[g], bb)
                for g in range(layout.n_groups)
                for bb in range(layout.baby)
            )
            z += rot(inner, layout.baby * a)
        valid = b.mask > 0
        z_all.append(z[valid])
        r = np.zeros(layout.slots)
        r[valid] = r_all[used : used + valid.sum()]
        used += valid.sum()
        for a in range(layout.giant):
            q[:, a] += b.diagonals[:, a] * rot(r, -layout.baby * a)
    assert np.allclose(np.concatenate(z_all), x @ w[:d])
    # giant steps share the feature pattern; the fold aligns baby step b with feature s mod g
    folded = [fold_products(list(qg), 0, rot) for qg in q.sum(axis=1)]
    grad = gradient_map(np.stack(folded), layout)
    assert np.allclose(grad[:d], x.T @ r_all)
    assert np.allclose(grad[d:], 0)
    assert np.allclose(unpattern(pattern, layout), w)


def _reference_gd(x, y, n_classes, epochs, lr, n_padded, approx):
    """Obviously-correct numpy GD with the same polynomial and step normalisation."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    t = y.reshape(-1, 1).astype(float) if n_classes == 2 else np.eye(n_classes)[y]
    w = np.zeros((x1.shape[1], t.shape[1]))
    for _ in range(epochs):
        w -= lr / n_padded * x1.T @ (approx(x1 @ w) - t)
    return w


def _data(n_classes: int, d: int, seed: int):
    """Three hospitals' features and labels, and their layout (several blocks at 128 slots)."""
    rng = np.random.default_rng(seed)
    sizes = [70, 45, 120]
    data = [(rng.normal(size=(s, d)) / np.sqrt(d), rng.integers(0, n_classes, s)) for s in sizes]
    layout = plan_diagonal(
        [n_buckets(s, 32) for s in sizes], slots=128, n_classes=n_classes, bucket=32, n_features=d
    )
    return data, layout


def _plain_training_and_reference(data, layout, parts: int, epochs: int):
    """The plain diagonal head trained on ``parts`` computes, and the reference GD's."""
    schedule = HeadSchedule(epochs, 3.0, fit_sigmoid(3, 8.0))
    computes = []
    for _ in range(parts):
        c = DiagonalCompute(PlainDiagonalBackend(layout), layout)
        c.blocks = blocks_from_packed(_sum_blocks(data, layout), layout)
        computes.append(c)
    w, b = train_diagonal(PlainDiagonalBackend(layout), computes, layout, schedule)
    x = np.vstack([a for a, _ in data])
    y = np.concatenate([t for _, t in data])
    want = _reference_gd(x, y, layout.n_classes, epochs, 3.0, layout.n_padded, schedule.approx)
    return head_matrix(w, b, layout), want


# (5, 2), (7, 2), (7, 3): whole heads, and the left-over head split by blocks
@pytest.mark.parametrize(
    "n_classes,parts", [(2, 1), (3, 1), (2, 3), (3, 2), (4, 2), (5, 2), (7, 2), (7, 3)]
)
def test_plain_diagonal_training_equals_reference_gd(n_classes, parts):
    data, layout = _data(n_classes, 20, seed=n_classes)
    assert layout.n_blocks > 1  # exercise several blocks
    got, want = _plain_training_and_reference(data, layout, parts, epochs=5)
    assert np.allclose(got, want, atol=1e-10)


class _RisingTakesAtMost(ClaimBoard):
    """Hands the rising (left) share at most ``limit`` cells of each contest."""

    limit = 0

    def take(self, contest):
        given = self.open.get(contest.key, [contest.cells.start])[0] - contest.cells.start
        if contest.rising and given >= self.limit:
            return None
        return super().take(contest)


@pytest.mark.parametrize("parts,limit", [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1)])
def test_contested_cells_train_the_same_whoever_takes_them(monkeypatch, parts, limit):
    import medfed.train.diagonal.epoch as ep

    data, layout = _data(2, 40, seed=parts)  # 3 blocks of 8 giant steps
    shares = plan_shares(layout, parts, layout.n_blocks)
    assert all(sh.contests for sh in shares)  # the split really is contested
    monkeypatch.setattr(ep, "ClaimBoard", type("B", (_RisingTakesAtMost,), {"limit": limit}))
    got, want = _plain_training_and_reference(data, layout, parts, epochs=3)
    assert np.allclose(got, want, atol=1e-10)


def test_claim_board_hands_each_cell_out_once_from_either_end():
    from medfed.train.diagonal.claims import Contest

    board = ClaimBoard()
    up, down = Contest(0, range(3, 7), True), Contest(0, range(3, 7), False)
    got = [board.take(up), board.take(down), board.take(down), board.take(up), board.take(up)]
    assert got == [3, 6, 5, 4, None] and board.take(down) is None


def test_work_split_is_a_partition():
    for total in (1, 4, 8, 24):  # giant steps, (group, baby) units
        for parts in (1, 2, 3, 16):
            ranges = split_range(total, parts)
            assert [a for r in ranges for a in r] == list(range(total))
            assert all(len(r) > 0 for r in ranges)


def test_shares_cover_every_cell_unit_and_residual_once():
    for n_classes in (2, 3, 4, 5, 7):
        layout = plan_diagonal([4], slots=256, n_classes=n_classes, bucket=32, n_features=40)
        G, B, H, A = layout.n_groups, layout.baby, layout.n_heads, layout.giant
        for n_blocks in (1, 3):
            for parts in (1, 2, 3, 4):
                shares = plan_shares(layout, parts, n_blocks)
                contested = {
                    (k, c.key): c.cells for sh in shares for k in sh.heads for c in sh.contests
                }
                cells = sorted(
                    [(k, c) for sh in shares for k in sh.heads for c in sh.cells]
                    + [(k, c) for (k, _), rng in contested.items() for c in rng]
                )  # each cell fixed to one share, or contested by two neighbours
                assert cells == [(k, c) for k in range(H) for c in range(n_blocks * A)]
                for sh in shares:
                    assert len(sh.cells) > 0 and all(c.cells for c in sh.contests)
                    assert all(c % A for t in sh.contests for c in t.cells)  # owners stay fixed
                    sides = sorted(t.rising for t in sh.contests)
                    assert sides in ([], [False], [True], [False, True])
                # backward products: an exchanging share's units over every block (the others
                # publish their residuals), else its units over the blocks it owns
                seen = {
                    i: range(n_blocks) if sh.exchange else sh.owned for i, sh in enumerate(shares)
                }
                products = sorted(
                    (k, i, u)
                    for j, sh in enumerate(shares)
                    for k in sh.heads
                    for i in seen[j]
                    for u in sh.units
                )
                assert products == [
                    (k, i, u) for k in range(H) for i in range(n_blocks) for u in range(G * B)
                ]
                owned = sorted((k, i) for sh in shares for k in sh.heads for i in sh.owned)
                assert owned == [(k, i) for k in range(H) for i in range(n_blocks)]
                biases = sorted(
                    (k, i)
                    for j, sh in enumerate(shares)
                    if sh.with_bias
                    for k in sh.heads
                    for i in seen[j]
                )
                assert biases == [(k, i) for k in range(H) for i in range(n_blocks)]
                every = [(g, b) for g in range(G) for b in range(1, B)]

                def made(sh):  # rotations rot(W_g, b), b >= 1, one share makes
                    return [(g, b) for g, lo, hi in sh.chains for b in range(lo, hi + 1)]

                exchanging = [sh for sh in shares if sh.exchange]
                if exchanging:  # each made once, and passed on
                    assert sorted(r for sh in exchanging for r in made(sh)) == every
                assert all(sorted(made(sh)) == every for sh in shares if not sh.exchange)
                assert all(len(sh.units) > 0 for sh in shares)
                assert {sh.compute for sh in shares} == set(range(min(parts, len(shares))))
                for sh in shares:  # a block's owner computes its giant step 0
                    assert all(i * A in sh.cells for i in sh.owned)
                    assert sh.exchange == (len(shares) > 1 and sh.heads == range(H))
    binary = plan_diagonal([4], slots=256, n_classes=2, bucket=32, n_features=40)
    assert plan_shares(binary, 2, 3)[0].exchange  # one head: cells split, z exchanged
    seven = plan_diagonal([4], slots=256, n_classes=7, bucket=32, n_features=40)
    split = plan_shares(seven, 2, 3)  # whole heads, 3 + 3, and the seventh by blocks
    assert [(len(sh.heads), sh.compute, sh.owned) for sh in split] == [
        (3, 0, (0, 1, 2)),
        (3, 1, (0, 1, 2)),
        (1, 0, (0, 1)),
        (1, 1, (2,)),
    ]
    assert [len(sh.heads) for sh in plan_shares(seven, 2, 1)] == [4, 3]  # one block: whole


def test_task_plan_gives_every_share_each_block_once_after_its_residuals():
    for n_classes in (2, 7):
        layout = plan_diagonal([4], slots=256, n_classes=n_classes, bucket=32, n_features=40)
        for n_blocks in (1, 3):
            for parts in (1, 2, 3, 4):
                shares = plan_shares(layout, parts, n_blocks)
                plans = plan_tasks(shares, layout.giant)
                order = submission_order(plans)
                assert sorted(order) == [(j, t) for j, p in enumerate(plans) for t in range(len(p))]
                formed = set()
                for j, t in order:
                    task = plans[j][t]
                    if task.method == "residuals":
                        formed.update(task.blocks)
                    else:  # a block's backward products come after its residuals are formed
                        assert set(task.blocks) <= formed
                for sh, plan in zip(shares, plans, strict=True):  # every block it sees, once
                    back = [i for task in plan if task.method == "backward" for i in task.blocks]
                    assert sorted(back) == (
                        list(range(n_blocks)) if sh.exchange else list(sh.owned)
                    )
                    assert [task.last for task in plan] == [False] * (len(plan) - 1) + [True]


def test_partial_folds_add_up_to_the_full_fold():
    rng = np.random.default_rng(3)
    q = list(rng.normal(size=(8, 64)))
    whole = fold_products(q, 0, rot)
    want = sum(rot(v, -b) for b, v in enumerate(q))
    assert np.allclose(whole, want)
    for cut in (1, 3, 4, 7):  # a worker that owns baby steps cut.. shifts by -cut
        assert np.allclose(fold_products(q[:cut], 0, rot) + fold_products(q[cut:], cut, rot), want)


def test_layout_rejects_bad_inputs():
    layout = plan_diagonal([1], slots=128, n_classes=2, bucket=32, n_features=4)
    with pytest.raises(LayoutError, match="columns"):
        pack_diagonal(np.zeros((3, 5)), np.zeros(3, int), layout, 0)
    with pytest.raises(LayoutError, match="more samples"):
        pack_diagonal(np.zeros((40, 4)), np.zeros(40, int), layout, 0)


def test_baby_rotations_take_the_cheaper_chain():
    w = np.arange(64.0)
    for lo in range(1, 8):
        for hi in range(lo, 8):
            calls = []

            def counted(v, k, calls=calls):
                calls.append(k)
                return rot(v, k)

            got = baby_rotations(w, lo, hi, 8, 64, counted)
            assert sorted(got) == list(range(lo, hi + 1))
            assert all(np.array_equal(v, rot(w, b)) for b, v in got.items())
            assert len(calls) == min(hi, 1 + 8 - lo)
    # without a +baby key (baby == group) only the +1 chain is possible
    assert len(baby_rotations(np.arange(8.0), 5, 7, 8, 8, lambda v, k: rot(v, k))) == 3


def test_binary_two_worker_plan_fuses_calls():
    # 3 blocks, one head, 2 workers: 9 Ray calls (rotate and forward on each, plus these)
    layout = plan_diagonal([313], slots=4096, n_classes=2, bucket=32, n_features=192)
    shares = plan_shares(layout, 2, layout.n_blocks)
    plans = plan_tasks(shares, layout.giant)
    calls = [[(t.method, t.blocks) for t in plan if not t.fused] for plan in plans]
    assert calls == [
        [("backward", (0,)), ("residuals", (1,)), ("backward", (1, 2))],
        [("backward", (2, 0)), ("backward", (1,))],
    ]
    assert [[t.blocks for t in plan if t.fused] for plan in plans] == [[(0,)], [(2,)]]
    # one worker: residuals in the forward call, then one backward call
    (single,) = plan_tasks(plan_shares(layout, 1, layout.n_blocks), layout.giant)
    assert [(t.method, t.fused) for t in single] == [("residuals", True), ("backward", False)]
