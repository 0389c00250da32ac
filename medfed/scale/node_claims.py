"""Contested forward cells handed out through shared memory, for workers on one node.

The pool's :class:`~medfed.scale.workers.ClaimDesk` is a Ray actor: each take is an actor call
(about 0.9 ms, and the desk's own process spends about 13 ms of CPU per 2-worker epoch on the
cores the workers need). Workers on the same node share a small file in ``/dev/shm`` instead:
a record per (contest, recent epoch) holding the next low cell and one past the high, changed
under a POSIX record lock, with :meth:`medfed.train.diagonal.claims.ClaimBoard.take`'s
semantics (both step a span with :func:`~medfed.train.diagonal.claims.next_cell`). The file
holds cell numbers and epoch ids only, like the desk; it is unlinked as soon as every worker
has opened it, so it goes away with the workers.
"""

from __future__ import annotations

import fcntl
import os
import struct

from medfed.train.diagonal.claims import EPOCHS_KEPT, Contest, next_cell

_RECORD = struct.Struct("<16sqqq")  # epoch id, order of first use, next low cell, one past high


class NodeClaimBoard:
    """One worker's handle on the node's claim file (``contests`` boundaries between shares)."""

    def __init__(self, path: str, contests: int) -> None:
        self.path = path
        self.contests = contests
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = _RECORD.size * EPOCHS_KEPT * max(1, contests)
        if os.fstat(self.fd).st_size < size:  # every worker sizes it alike; no data is lost
            os.ftruncate(self.fd, size)

    def take(self, epoch: str, contest: Contest) -> int | None:
        """The next cell of ``contest`` in ``epoch`` from the caller's end, or None."""
        if not 0 <= contest.key < self.contests:
            raise ValueError(f"contest {contest.key} is outside this pool's {self.contests}")
        tag = bytes.fromhex(epoch)
        start = contest.key * EPOCHS_KEPT * _RECORD.size
        length = EPOCHS_KEPT * _RECORD.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, length, start)
        try:
            raw = os.pread(self.fd, length, start)
            records = [_RECORD.unpack_from(raw, i * _RECORD.size) for i in range(EPOCHS_KEPT)]
            slot = next((i for i, r in enumerate(records) if r[0] == tag), None)
            if slot is None:  # this epoch's first take: replace the oldest board
                slot = min(range(EPOCHS_KEPT), key=lambda i: records[i][1])
                newest = max(r[1] for r in records)
                records[slot] = (tag, newest + 1, contest.cells.start, contest.cells.stop)
            tag, used, low, high = records[slot]
            cell, low, high = next_cell(low, high, contest.rising)
            os.pwrite(self.fd, _RECORD.pack(tag, used, low, high), start + slot * _RECORD.size)
            return cell
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, length, start)

    def unlink(self) -> None:
        """Remove the file's name (once every worker has it open)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class EpochView:
    """One epoch of a :class:`NodeClaimBoard`: a
    :class:`~medfed.train.diagonal.claims.Claims` board, ``take(contest)``."""

    def __init__(self, board: NodeClaimBoard, epoch: str) -> None:
        self.board, self.epoch = board, epoch

    def take(self, contest: Contest) -> int | None:
        """The next cell of ``contest`` in this epoch from the caller's end, or None."""
        return self.board.take(self.epoch, contest)
