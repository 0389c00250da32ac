"""Encrypted batch workers: long-lived Ray actors that hold the aggregator's public keys.

Each worker loads the public context and Galois keys once, keeps the uploaded feature
ciphertexts resident, and computes its share of every epoch (a range of giant steps).
Ciphertexts travel as bytes (SEAL objects do not pickle). Workers belong to the aggregator
and hold exactly what it holds: no secret key.
"""

from __future__ import annotations

from collections.abc import Sequence

from medfed.crypto.context import load_public_context
from medfed.crypto.diagonal import DiagonalLayout
from medfed.crypto.seal import SealEngine
from medfed.train.diagonal_head import Block, DiagonalCompute, EncryptedDiagonalBackend


def block_to_bytes(engine: SealEngine, block: Block) -> dict:
    return {
        "diagonals": [[[engine.to_bytes(v) for v in a] for a in g] for g in block.diagonals],
        "mask": engine.to_bytes(block.mask),
    }


class DiagonalWorker:
    """The worker's state and methods (wrapped by ``ray.remote`` in :func:`start_workers`)."""

    def __init__(self, public_context: bytes, galois_keys: bytes, layout: dict, mask_bits: int):
        ctx = load_public_context(public_context, sender="aggregator")
        self.engine = SealEngine(ctx, galois_keys=galois_keys)
        self.layout = DiagonalLayout.from_dict(layout)
        self.backend = EncryptedDiagonalBackend(self.engine, self.layout, None, mask_bits)
        self.compute = DiagonalCompute(self.backend, self.layout)

    def load_blocks(self, blocks: list[dict]) -> int:
        e = self.engine
        self.compute.blocks = [
            Block(
                [
                    [[e.from_bytes(v, sender="aggregator", item="x") for v in a] for a in g]
                    for g in blk["diagonals"]
                ],
                e.from_bytes(blk["mask"], sender="aggregator", item="mask"),
                [],
            )
            for blk in blocks
        ]
        return len(self.compute.blocks)

    def forward(self, weights: list[list[bytes]], start: int, stop: int) -> list[list[bytes]]:
        e = self.engine
        w = [[e.from_bytes(v, sender="aggregator", item="w") for v in wk] for wk in weights]
        out = self.compute.forward(w, range(start, stop))
        return [[e.to_bytes(v) for v in per_block] for per_block in out]

    def backward(self, residuals: list[list[bytes]], start: int, stop: int, with_bias: bool):
        e = self.engine
        r = [[e.from_bytes(v, sender="aggregator", item="r") for v in rk] for rk in residuals]
        return self.compute.backward(r, range(start, stop), with_bias)


class _RayHandle:
    def __init__(self, ref, convert) -> None:
        self.ref, self.convert = ref, convert

    def result(self):
        import ray

        return self.convert(ray.get(self.ref))


class RemoteCompute:
    """Driver-side proxy with the DiagonalCompute interface, running on a Ray actor."""

    def __init__(self, actor, engine: SealEngine) -> None:
        self.actor = actor
        self.engine = engine

    def submit_forward(self, weights, steps: range) -> _RayHandle:
        e = self.engine
        wb = [[e.to_bytes(v) for v in wk] for wk in weights]
        ref = self.actor.forward.remote(wb, steps.start, steps.stop)
        return _RayHandle(
            ref,
            lambda out: [[e.from_bytes(v, sender="worker", item="z") for v in pb] for pb in out],
        )

    def submit_backward(self, residuals, steps: range, with_bias: bool) -> _RayHandle:
        e = self.engine
        rb = [[e.to_bytes(v) for v in rk] for rk in residuals]
        ref = self.actor.backward.remote(rb, steps.start, steps.stop, with_bias)
        return _RayHandle(ref, lambda out: out)


def start_workers(
    n: int,
    engine: SealEngine,
    public_context: bytes,
    galois_keys: bytes,
    layout: DiagonalLayout,
    mask_bits: int,
    blocks: Sequence[Block],
    cpus_per_worker: float = 1.0,
) -> list[RemoteCompute]:
    """Start ``n`` actors, ship the public material and the blocks once, return proxies."""
    import ray

    actor_cls = ray.remote(num_cpus=cpus_per_worker)(DiagonalWorker)
    actors = [
        actor_cls.remote(public_context, galois_keys, layout.to_dict(), mask_bits) for _ in range(n)
    ]
    payload = ray.put([block_to_bytes(engine, b) for b in blocks])
    ray.get([a.load_blocks.remote(payload) for a in actors])
    return [RemoteCompute(a, engine) for a in actors]


def stop_workers(computes: Sequence) -> None:
    import ray

    for c in computes:
        if isinstance(c, RemoteCompute):
            ray.kill(c.actor)
