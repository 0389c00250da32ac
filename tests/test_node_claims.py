"""The node claim file: contested cells handed out once, from either end, across processes."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid

import pytest

from medfed.scale.node_claims import EpochView, NodeClaimBoard
from medfed.train.diagonal.claims import EPOCHS_KEPT, ClaimBoard, Contest


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "claims")


def _epoch() -> str:
    return uuid.uuid4().hex


def test_takes_match_the_in_process_board(path):
    board, local = NodeClaimBoard(path, contests=2), ClaimBoard()
    view = EpochView(board, local.epoch)
    contests = [
        Contest(0, range(3, 7), True),
        Contest(0, range(3, 7), False),
        Contest(1, range(10, 13), True),
        Contest(1, range(10, 13), False),
    ]
    order = [0, 1, 1, 2, 3, 0, 0, 2, 3, 1, 2]
    assert [view.take(contests[i]) for i in order] == [local.take(contests[i]) for i in order]


def test_epochs_do_not_share_cells(path):
    board = NodeClaimBoard(path, contests=1)
    up = Contest(0, range(0, 4), True)
    old, new = _epoch(), _epoch()
    assert [board.take(old, up), board.take(old, up)] == [0, 1]
    assert board.take(new, up) == 0  # a new epoch's board starts full
    assert board.take(old, up) == 2  # and the earlier one goes on where it was
    for _ in range(EPOCHS_KEPT):  # the oldest board makes room for newer ones
        board.take(_epoch(), up)
    assert board.take(old, up) == 0


def test_a_contest_outside_the_pool_is_refused(path):
    with pytest.raises(ValueError, match="outside"):
        NodeClaimBoard(path, contests=1).take(_epoch(), Contest(1, range(2), True))


def _take_all(path: str, epoch: str, rising: bool, start, out) -> None:
    board = NodeClaimBoard(path, contests=1)
    contest = Contest(0, range(0, 400), rising)
    got = []
    start.wait()
    while (cell := board.take(epoch, contest)) is not None:
        got.append(cell)
        time.sleep(0.0002)  # a cell's work: the two takers interleave
    out.put((rising, got))


def test_two_processes_take_every_cell_exactly_once(path):
    NodeClaimBoard(path, contests=1)
    epoch = _epoch()
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_take_all, args=(path, epoch, r, start, out)) for r in (True, False)
    ]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    low, high = got[True], got[False]
    assert low and high  # both took cells: the lock was contended
    assert sorted(low + high) == list(range(400))  # each cell once, none lost
    assert low == list(range(len(low)))  # the rising side from the low end up
    assert high == list(range(399, 399 - len(high), -1))  # the other from the top down
