"""Encrypted batch workers: long-lived Ray actors that hold the aggregator's public keys.

Each worker loads the public context and Galois keys once, keeps the uploaded feature
ciphertexts resident, and computes its share of every epoch. Ciphertexts travel as bytes (SEAL
objects do not pickle): between the aggregator's own processes in SEAL's uncompressed format
(:mod:`medfed.crypto.uncompressed`), so sharing a rotation costs less than computing it again.
Workers belong to the aggregator and hold exactly what it holds: no secret key.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from medfed.crypto.context import load_public_context
from medfed.crypto.diagonal import DiagonalLayout
from medfed.crypto.scratch import shared_dir
from medfed.crypto.seal import SealEngine
from medfed.scale.node_claims import EpochView, NodeClaimBoard
from medfed.train.diagonal.backend import Block
from medfed.train.diagonal.claims import EPOCHS_KEPT, ClaimBoard, Contest
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.encrypted import EncryptedDiagonalBackend
from medfed.train.diagonal.planner import Share


def block_to_bytes(engine: SealEngine, block: Block) -> dict:
    """One uploaded block's ciphertexts serialized (SEAL's compressed format), for the workers."""
    return {
        "diagonals": [[[engine.to_bytes(v) for v in a] for a in g] for g in block.diagonals],
        "mask": engine.to_bytes(block.mask),
        "targets": [engine.to_bytes(t) for t in block.targets],
    }


class DiagonalWorker:
    """The worker's state and methods (wrapped by ``ray.remote`` in :func:`start_workers`)."""

    def __init__(self, public_context: bytes, galois_keys: bytes, layout: dict):
        ctx = load_public_context(public_context, sender="aggregator")
        self.engine = SealEngine(ctx, galois_keys=galois_keys)
        self.layout = DiagonalLayout.from_dict(layout)
        self.backend = EncryptedDiagonalBackend(self.engine, self.layout, None)
        self.compute = DiagonalCompute(self.backend, self.layout)
        self.biases: tuple | None = None  # (the epoch's bias bytes, loaded biases)
        self.claims: NodeClaimBoard | None = None  # the node's claim file, shared by the pool

    def node_id(self) -> str:
        """The id of the Ray node this worker runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def open_claims(self, name: str, contests: int) -> None:
        """Join the pool's claim file (``name`` in the node's shared directory)."""
        self.claims = NodeClaimBoard(os.path.join(shared_dir(), name), contests)

    def unlink_claims(self) -> None:
        """Remove the claim file's name once every worker of the pool has it open."""
        if self.claims is not None:
            self.claims.unlink()

    def _load(self, blob: bytes, item: str):
        return self.engine.from_bytes(blob, sender="aggregator", item=item)

    def load_blocks(self, blocks: list[dict]) -> int:
        """Load and keep the uploaded blocks (:func:`block_to_bytes` dicts); returns how many."""
        self.compute.blocks = [
            Block(
                [[[self._load(v, "x") for v in a] for a in g] for g in blk["diagonals"]],
                self._load(blk["mask"], "mask"),
                [self._load(t, "y") for t in blk["targets"]],
            )
            for blk in blocks
        ]
        return len(self.compute.blocks)

    def _nested(self, blob, item: str):
        if isinstance(blob, list):
            return [self._nested(b, item) for b in blob]
        return self.engine.from_bytes(blob, sender="worker", item=item)

    def _vectors(self, blobs: dict, item: str, keep) -> dict:
        return {i: self._nested(vs, item) for i, vs in blobs.items() if keep(i)}

    def _blobs(self, vectors: dict) -> dict:
        return {i: _dump(self.engine, vs) for i, vs in vectors.items()}

    def _weights(self, weights: list[list[bytes]], share: Share) -> list:
        """The share's heads' weights, loaded (None for the other heads)."""
        return [
            [self._load(v, "w") for v in wk] if k in share.heads else None
            for k, wk in enumerate(weights)
        ]

    def rotate(self, weights: list[list[bytes]], share: Share) -> dict[tuple, bytes]:
        """This share's weight rotations (kept, and returned when shared)."""
        return self._blobs(self.compute.rotate(self._weights(weights, share), share))

    def _biases(self, biases: list[bytes], share: Share) -> list:
        """The biases of the share's heads, loaded once per epoch (None for the others)."""
        if self.biases is None or self.biases[0] != biases:
            self.biases = (biases, [None] * len(biases))
        loaded = self.biases[1]
        for k in share.heads:
            if loaded[k] is None:
                loaded[k] = self._load(biases[k], "bias")
        return loaded

    def forward(
        self, weights, share: Share, rotations: list, biases, c, approx, blocks: tuple, desk=None
    ) -> dict:
        """Forward pass and the residuals of ``blocks``; ``weights`` is None when
        :meth:`rotate` ran. ``rotations``: object references of the other shares' published
        weight rotations, fetched once this worker's first cells are under way. ``desk``:
        ``(ClaimDesk actor, epoch)`` that hands out the share's contested cells, or
        ``(None, epoch)`` when the pool shares a claim file on this node."""
        if weights is not None:
            weights = self._weights(weights, share)

        def fetch() -> list[dict]:
            import ray

            return [self._vectors(r, "rot(w)", lambda key: True) for r in ray.get(rotations)]

        b = self._biases(biases, share) if blocks else None
        board = None
        if desk is not None:
            board = _DeskBoard(*desk) if desk[0] is not None else self._node_board(desk[1])
        out = self.compute.forward(weights, fetch, share, b, c, approx, blocks, board)
        return {name: self._blobs(v) for name, v in out.items()}

    def _node_board(self, epoch: str) -> EpochView:
        if self.claims is None:
            raise RuntimeError("this worker has not joined its pool's claim file (open_claims)")
        return EpochView(self.claims, epoch)

    def residuals(self, biases, c, approx, share: Share, blocks: tuple, *published) -> dict:
        """Residuals of ``blocks``; ``published``: the forward outputs with their partial z."""
        loaded = [{"z": self._vectors(p["z"], "z", lambda i: i in blocks)} for p in published]
        out = self.compute.residuals(loaded, self._biases(biases, share), c, approx, share, blocks)
        return {"r": self._blobs(out["r"])}

    def backward(self, share: Share, blocks: tuple, last: bool, *published) -> dict | None:
        """``published``: the outputs that carry the residuals of ``blocks`` (its own stay
        loaded)."""
        kept = self.compute.kept(share).residual
        loaded = [
            {"r": self._vectors(p["r"], "r", lambda i: i in blocks and i not in kept)}
            for p in published
        ]
        return self.compute.backward(loaded, share, blocks, last)


class ClaimDesk:
    """Ray actor holding each epoch's :class:`ClaimBoard`: workers take contested forward
    cells from it, so the faster worker of two neighbours computes more of them. For pools
    spread over nodes; workers on one node share a claim file instead (cheaper per take)."""

    def __init__(self) -> None:
        self.boards: dict[str, ClaimBoard] = {}

    def ready(self) -> bool:
        """Answer once the actor has started."""
        return True

    def take(self, epoch: str, contest: Contest) -> int | None:
        """The next cell of ``contest`` in ``epoch`` for the caller, or None when none is left."""
        if epoch not in self.boards:
            if len(self.boards) >= EPOCHS_KEPT:  # earlier epochs are over
                self.boards.pop(next(iter(self.boards)))
            self.boards[epoch] = ClaimBoard()
        return self.boards[epoch].take(contest)


class _DeskBoard:
    """A worker's view of the desk: :meth:`take` as a :class:`ClaimBoard` would. Each take
    also asks for the next cell, so the answer travels while the worker computes this one."""

    def __init__(self, desk, epoch: str) -> None:
        self.desk, self.epoch = desk, epoch
        self.asked: dict[int, object] = {}  # contest key -> the pending take's reference

    def take(self, contest: Contest) -> int | None:
        import ray

        ref = self.asked.pop(contest.key, None)
        cell = ray.get(ref if ref is not None else self.desk.take.remote(self.epoch, contest))
        if cell is not None:
            self.asked[contest.key] = self.desk.take.remote(self.epoch, contest)
        return cell


def _dump(engine: SealEngine, v):
    """(Nested lists of) ciphertexts as uncompressed bytes, for the aggregator's processes."""
    if isinstance(v, list):
        return [_dump(engine, x) for x in v]
    return engine.to_uncompressed_bytes(v)


class _RayHandle:
    def __init__(self, ref) -> None:
        self.ref = ref

    def result(self):
        import ray

        return ray.get(self.ref)

    def share(self):
        """The object reference: other workers fetch it, the driver never deserializes it."""
        return self.ref


class _Broadcast:
    """Serialize and ``ray.put`` (nested lists of) ciphertexts once for every worker."""

    def __init__(self, engine: SealEngine) -> None:
        self.engine = engine
        self.cache: dict[str, tuple[object, object]] = {}  # name -> (source list, object ref)

    def ref(self, name: str, vectors: list):
        import ray

        last = self.cache.get(name)
        if last is None or last[0] is not vectors:
            last = self.cache[name] = (vectors, ray.put(_dump(self.engine, vectors)))
        return last[1]


NODE_CLAIMS = "node claim file"  # RemoteCompute.desk of a pool whose workers share one node


class RemoteCompute:
    """Driver-side proxy with the DiagonalCompute interface, running on a Ray actor."""

    def __init__(
        self,
        actor,
        engine: SealEngine,
        n_blocks: int,
        broadcast: _Broadcast | None = None,
        desk=None,
    ) -> None:
        self.actor = actor
        self.engine = engine
        self.n_blocks = n_blocks
        self.broadcast = broadcast if broadcast is not None else _Broadcast(engine)
        self.desk = desk  # the pool's ClaimDesk actor, NODE_CLAIMS, or None (one worker)

    def submit_rotate(self, weights, share: Share) -> _RayHandle:
        """Ask the worker for :meth:`DiagonalWorker.rotate` (weights broadcast once to the pool)."""
        return _RayHandle(self.actor.rotate.remote(self.broadcast.ref("weights", weights), share))

    def submit_forward(
        self, weights, rotations, share: Share, biases, c, approx, blocks, board=None
    ) -> _RayHandle:
        """Ask the worker for :meth:`DiagonalWorker.forward` (with the claim desk for contests)."""
        w = self.broadcast.ref("weights", weights) if weights is not None else None
        b = self.broadcast.ref("biases", biases)
        rotations = list(rotations)  # nested: fetched by the worker, not awaited by Ray
        desk = None
        if board is not None and share.contests:
            if self.desk is None:
                raise RuntimeError("a share with contested cells needs the pool's ClaimDesk")
            desk = (None if self.desk is NODE_CLAIMS else self.desk, board.epoch)
        return _RayHandle(
            self.actor.forward.remote(w, share, rotations, b, c, approx, blocks, desk)
        )

    def submit_residuals(self, published, biases, c, approx, share: Share, blocks) -> _RayHandle:
        """Ask the worker for :meth:`DiagonalWorker.residuals` of ``blocks``."""
        b = self.broadcast.ref("biases", biases)
        return _RayHandle(self.actor.residuals.remote(b, c, approx, share, blocks, *published))

    def submit_backward(self, published, share: Share, blocks, last: bool) -> _RayHandle:
        """Ask the worker for :meth:`DiagonalWorker.backward` of ``blocks``."""
        return _RayHandle(self.actor.backward.remote(share, blocks, last, *published))


def start_workers(
    n: int,
    engine: SealEngine,
    public_context: bytes,
    galois_keys: bytes,
    layout: DiagonalLayout,
    blocks: Sequence[Block],
    cpus_per_worker: float = 1.0,
    claims: str = "auto",
) -> list[RemoteCompute]:
    """Start ``n`` actors, ship the public material and the blocks once, return proxies.

    ``claims``: how the workers share contested cells: ``"node"``, a claim file
    (:mod:`medfed.scale.node_claims`; every worker on one node), ``"desk"``, a
    :class:`ClaimDesk` actor, or ``"auto"``: the file when the workers share a node.
    """
    if claims not in ("auto", "node", "desk"):
        raise ValueError(f"claims={claims!r}: use 'auto', 'node' or 'desk'")
    import ray

    actor_cls = ray.remote(num_cpus=cpus_per_worker)(DiagonalWorker)
    actors = [actor_cls.remote(public_context, galois_keys, layout.to_dict()) for _ in range(n)]
    try:
        payload = ray.put([block_to_bytes(engine, b) for b in blocks])
        ray.get([a.load_blocks.remote(payload) for a in actors])
        desk = None
        if n > 1 and claims != "desk":
            nodes = set(ray.get([a.node_id.remote() for a in actors]))
            if len(nodes) > 1 and claims == "node":
                raise ValueError(
                    f"claims='node' needs every worker on one node; these run on {len(nodes)}: "
                    "use claims='auto' or 'desk'"
                )
            claims = "node" if len(nodes) == 1 else "desk"
        if n > 1 and claims == "node":
            name = f"medfed-claims-{uuid.uuid4().hex}"
            ray.get([a.open_claims.remote(name, n - 1) for a in actors])
            ray.get(actors[0].unlink_claims.remote())
            desk = NODE_CLAIMS
        elif n > 1:
            desk = ray.remote(num_cpus=0)(ClaimDesk).remote()
            ray.get(desk.ready.remote())  # started now, not in the first epoch
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    broadcast = _Broadcast(engine)
    return [RemoteCompute(a, engine, len(blocks), broadcast, desk) for a in actors]


def stop_workers(computes: Sequence) -> None:
    """Kill the worker actors among ``computes`` and their pool's claim desk (local ones stay)."""
    import ray

    desks = {}
    for c in computes:
        if isinstance(c, RemoteCompute):
            ray.kill(c.actor)
            if c.desk is not None and c.desk is not NODE_CLAIMS:
                desks[id(c.desk)] = c.desk
    for desk in desks.values():
        ray.kill(desk)
