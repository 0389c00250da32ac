"""The untrusted aggregator: a Flower ServerApp that trains the head on ciphertexts.

It holds only the public context. Stages (each one Flower round):

1. ``stats``: hospitals send encrypted feature sums and a bucket count; the lead hospital also
   sends the public context. The aggregator adds the sums (it cannot read them).
2. ``upload``: hospitals receive the encrypted total (to normalize with a shared rule) and the
   slot layout, and send encrypted feature and label blocks.
3. ``sum`` (one per epoch): masked gradient products go to one hospital in turn, which returns
   encrypted segment sums at a fresh level.
4. ``final``: the encrypted head goes to every hospital, which decrypts and evaluates it.

A hospital whose reply fails is excluded from that stage, recorded with the reason, and the run
continues with the others where that is safe.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from medfed.crypto.context import (
    CiphertextError,
    context_fingerprint,
    load_ciphertext,
    load_public_context,
)
from medfed.crypto.packing import SlotLayout, plan_layout
from medfed.crypto.params import CKKSParams
from medfed.fl import messages as M
from medfed.train.encrypted import EncryptedBackend
from medfed.train.head import HeadSchedule, train_head

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot continue (e.g. too few hospitals answered)."""


@dataclass
class Ledger:
    """Bytes and seconds per party and per round, as the aggregator observes them."""

    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    rounds: list[dict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)

    def exclude(self, stage: str, hospital: str, reason: str) -> None:
        log.warning("excluding %s from %s: %s", hospital, stage, reason)
        self.excluded.append({"stage": stage, "hospital": hospital, "reason": reason})


@dataclass
class AggregatorSettings:
    """What the aggregator knows: public parameters and the schedule, no data."""

    params: CKKSParams
    schedule: HeadSchedule
    n_classes: int
    n_features: int
    bucket: int
    expected_hospitals: int
    min_hospitals: int = 1
    node_wait_seconds: float = 120.0
    reply_timeout: float | None = None


class EncryptedEmbeddingsStrategy:
    """Mode "embeddings", shared key: the whole protocol, written once over a Flower Grid."""

    def __init__(
        self,
        settings: AggregatorSettings,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.s = settings
        self.ledger = Ledger()
        self.on_step = on_step
        self.names: dict[int, str] = {}
        self.ctx: ts.Context | None = None
        self.layout: SlotLayout | None = None

    # -- plumbing -------------------------------------------------------------------------
    def _exchange(
        self, grid: Grid, stage: str, payloads: dict[int, dict], message_type: str
    ) -> dict[int, dict]:
        """Send one message per node; return the successful replies' records by node."""
        t0 = time.perf_counter()
        msgs = []
        for node, values in payloads.items():
            content = M.make_content(**values)
            self.ledger.down[node] += M.payload_bytes(content)
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        replies = grid.send_and_receive(msgs, timeout=self.s.reply_timeout)
        out: dict[int, dict] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.ledger.exclude(stage, self._name(node), reply.error.reason)
                continue
            self.ledger.up[node] += M.payload_bytes(reply.content)
            out[node] = reply.content[M.RECORD]
        for node in payloads:
            if node not in out and not any(
                e["hospital"] == self._name(node) and e["stage"] == stage
                for e in self.ledger.excluded
            ):
                self.ledger.exclude(stage, self._name(node), "no reply before the timeout")
        self.ledger.rounds.append(
            {
                "stage": stage,
                "nodes": sorted(out),
                "seconds": round(time.perf_counter() - t0, 4),
            }
        )
        return out

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.s.node_wait_seconds
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.s.expected_hospitals:
                return nodes
            time.sleep(0.1)
        if len(nodes) < self.s.min_hospitals:
            raise FederationError(f"only {len(nodes)} hospitals connected")
        return nodes

    # -- stages ---------------------------------------------------------------------------
    def stats(self, grid: Grid, nodes: Iterable[int]) -> tuple[ts.CKKSVector, dict[int, int]]:
        replies = self._exchange(grid, "stats", {n: {} for n in nodes}, M.MSG_STATS)
        for node, rec in replies.items():
            self.names[node] = str(rec[M.HOSPITAL])
        lead = [rec for rec in replies.values() if M.PUBLIC_CONTEXT in rec]
        if not lead and replies:  # the lead hospital failed: ask another one
            node = sorted(replies)[0]
            extra = self._exchange(grid, "public-context", {node: {}}, M.MSG_PUBLIC_CONTEXT)
            lead = [rec for rec in extra.values() if M.PUBLIC_CONTEXT in rec]
        if not lead:
            raise FederationError("no hospital sent the public context")
        public = lead[0][M.PUBLIC_CONTEXT]
        self.ctx = load_public_context(public, sender=str(lead[0][M.HOSPITAL]))
        fingerprint = context_fingerprint(self.ctx)
        total, buckets = None, {}
        d = self.s.n_features
        for node, rec in replies.items():
            name = self.names[node]
            if rec[M.KEY_FINGERPRINT] != fingerprint:
                self.ledger.exclude("stats", name, "encrypts under a different key set")
                continue
            try:
                vec = load_ciphertext(
                    self.ctx, rec[M.STATS], size=2 * d + 1, sender=name, item="stats"
                )
            except CiphertextError as e:
                self.ledger.exclude("stats", name, str(e))
                continue
            buckets[node] = int(rec[M.BUCKETS])
            total = vec if total is None else total + vec
        if total is None or len(buckets) < self.s.min_hospitals:
            raise FederationError("too few hospitals sent usable statistics")
        return total, buckets

    def upload(
        self, grid: Grid, total: ts.CKKSVector, buckets: dict[int, int]
    ) -> tuple[list[list[ts.CKKSVector]], list[ts.CKKSVector]]:
        nodes = sorted(buckets)
        self.layout = layout = plan_layout(
            [buckets[n] for n in nodes],
            slots=self.s.params.slots,
            n_classes=self.s.n_classes,
            bucket=self.s.bucket,
            n_features=self.s.n_features,
        )
        layout_json = json.dumps(layout.to_dict())
        total_bytes = total.serialize()
        payloads = {
            n: {M.STATS_TOTAL: total_bytes, M.LAYOUT: layout_json, M.POSITION: position}
            for position, n in enumerate(nodes)
        }
        replies = self._exchange(grid, "upload", payloads, M.MSG_UPLOAD)
        cols = layout.n_columns
        x_blocks: list[list] = [[None] * cols for _ in range(layout.n_blocks)]
        y_blocks: list = [None] * layout.n_blocks
        for position, node in enumerate(nodes):
            if node not in replies:
                continue
            rec, name = replies[node], self._name(node)
            try:
                blocks = [int(b) for b in rec[M.BLOCKS]]
                if blocks != layout.blocks_of(position):
                    raise CiphertextError(
                        f"{name} sent blocks {blocks}, expected {layout.blocks_of(position)}"
                    )
                xs, ys = list(rec[M.FEATURES]), list(rec[M.LABELS])
                if len(xs) != len(blocks) * cols or len(ys) != len(blocks):
                    raise CiphertextError(
                        f"{name} sent {len(xs)} feature and {len(ys)} label ciphertexts, expected "
                        f"{len(blocks) * cols} and {len(blocks)}"
                    )
                loaded_x = [
                    load_ciphertext(
                        self.ctx, b, size=layout.slots, sender=name, item=f"feature {k}"
                    )
                    for k, b in enumerate(xs)
                ]
                loaded_y = [
                    load_ciphertext(self.ctx, b, size=layout.slots, sender=name, item="labels")
                    for b in ys
                ]
            except (CiphertextError, KeyError, ValueError) as e:
                self.ledger.exclude("upload", name, str(e))
                continue
            for k, block in enumerate(blocks):
                for j in range(cols):
                    v = loaded_x[k * cols + j]
                    cur = x_blocks[block][j]
                    x_blocks[block][j] = v if cur is None else cur + v
                y_blocks[block] = (
                    loaded_y[k] if y_blocks[block] is None else y_blocks[block] + loaded_y[k]
                )
        used = [b for b in range(layout.n_blocks) if y_blocks[b] is not None]
        if not used:
            raise FederationError("no hospital uploaded usable ciphertexts")
        return [x_blocks[b] for b in used], [y_blocks[b] for b in used]

    def train(self, grid: Grid, x_blocks, y_blocks) -> list[ts.CKKSVector]:
        keyholder = FlowerKeyHolder(self, grid)
        backend = EncryptedBackend(self.ctx, self.s.params, self.layout, keyholder)
        weights = train_head(
            backend, x_blocks, y_blocks, self.layout, self.s.schedule, on_step=self.on_step
        )
        self.refresh_records = backend.records
        return weights

    def final(self, grid: Grid, weights: list[ts.CKKSVector]) -> list[str]:
        blobs = [w.serialize() for w in weights]
        layout_json = json.dumps(self.layout.to_dict())
        payloads = {n: {M.WEIGHTS: blobs, M.LAYOUT: layout_json} for n in self.names}
        replies = self._exchange(grid, "final", payloads, M.MSG_FINAL)
        return [self._name(n) for n in replies]

    def run(self, grid: Grid) -> dict:
        t0 = time.perf_counter()
        nodes = self._wait_for_nodes(grid)
        total, buckets = self.stats(grid, nodes)
        x_blocks, y_blocks = self.upload(grid, total, buckets)
        weights = self.train(grid, x_blocks, y_blocks)
        evaluated = self.final(grid, weights)
        return {
            "aggregator_seconds": time.perf_counter() - t0,
            "layout": self.layout.to_dict(),
            "evaluated_by": evaluated,
            "bytes_up": {self._name(n): b for n, b in self.ledger.up.items()},
            "bytes_down": {self._name(n): b for n, b in self.ledger.down.items()},
            "rounds": [
                {
                    "stage": r["stage"],
                    "hospitals": [self._name(n) for n in r["nodes"]],
                    "seconds": r["seconds"],
                }
                for r in self.ledger.rounds
            ],
            "refreshes": [r.__dict__ for r in self.refresh_records],
            "excluded": self.ledger.excluded,
        }


class FlowerKeyHolder:
    """Round-robin over hospitals for the masked-sum round; skips one that fails."""

    def __init__(self, strategy: EncryptedEmbeddingsStrategy, grid: Grid) -> None:
        self.strategy = strategy
        self.grid = grid
        self.failed: set[int] = set()

    def sum_masked(self, masked: list[bytes], step: int) -> tuple[list[bytes], str]:
        nodes = [n for n in sorted(self.strategy.names) if n not in self.failed]
        layout_json = json.dumps(self.strategy.layout.to_dict())
        for attempt in range(len(nodes)):
            node = nodes[(step + attempt) % len(nodes)]
            payload = {M.MASKED: masked, M.LAYOUT: layout_json, M.STEP: step}
            replies = self.strategy._exchange(self.grid, f"sum-{step}", {node: payload}, M.MSG_SUM)
            if node in replies:
                sums = list(replies[node][M.SUMS])
                if len(sums) == len(masked):
                    return sums, self.strategy._name(node)
            self.failed.add(node)
        raise FederationError(f"no hospital could answer the masked-sum round of epoch {step}")


def make_aggregator_app(
    settings: AggregatorSettings, results: dict, on_step: Callable[[int], None] | None = None
) -> ServerApp:
    """A ServerApp running :class:`EncryptedEmbeddingsStrategy`; fills ``results`` when done."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = EncryptedEmbeddingsStrategy(settings, on_step=on_step)
        try:
            results.update(strategy.run(grid))
        except Exception as e:  # noqa: BLE001 - reported to the caller, not swallowed
            results["error"] = f"{type(e).__name__}: {e}"
            results["excluded"] = strategy.ledger.excluded
            raise

    return app


def as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)
