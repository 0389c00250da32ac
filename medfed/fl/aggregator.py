"""The untrusted aggregator: a Flower ServerApp that trains the head on ciphertexts.

It holds only the public context. Stages (each one Flower round):

1. ``stats``: hospitals send encrypted feature sums and a bucket count; the lead hospital also
   sends the public context (if it fails, the next hospital is asked in a ``public-context``
   round, and so on). The aggregator adds the sums (it cannot read them).
2. ``upload``: hospitals receive the encrypted total (to normalize with a shared rule) and the
   slot layout, and send encrypted feature and label blocks.
3. ``sum`` (one per epoch): masked gradient products go to one hospital in turn, which returns
   the encrypted per-feature sums (the weight update) at a fresh level.
4. ``final``: the encrypted head goes to every hospital, which decrypts and evaluates it
   (with differential privacy, the aggregator first adds Gaussian noise inside it:
   :meth:`EmbeddingsAggregator.add_noise`).

A hospital whose reply fails is excluded from that stage, recorded with the reason, and the run
continues with the others where that is safe (at least ``min_hospitals`` contribute).

Every message carries the stage name and a fresh round id, signed; a reply must echo the round
id, keep the hospital name its node announced at ``stats``, match its digest and carry that
hospital's signature. A corrupt, replayed, forged or impersonating reply is excluded like a
failed one (see :func:`medfed.fl.messages.check_reply` and ``verify_reply``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import tenseal as ts
from flwr.serverapp import Grid, ServerApp

from medfed.crypto.context import CiphertextError
from medfed.crypto.diagonal import DiagonalLayout, plan_diagonal
from medfed.crypto.params import CKKSParams
from medfed.crypto.seal import SealEngine, SealVec
from medfed.crypto.signing import SigningKey
from medfed.fl import messages as M
from medfed.fl.key_holders import FlowerKeyHolder
from medfed.fl.public_keys import load_public_keys
from medfed.fl.server_app import Ledger, RoundExchange, make_aggregator_server_app
from medfed.privacy.mechanisms import secure_rng
from medfed.privacy.sensitivity import OutputNoise
from medfed.train.diagonal.backend import Block, BlockSums
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.encrypted import EncryptedDiagonalBackend
from medfed.train.diagonal.epoch import perturb_head, train_diagonal
from medfed.train.head import HeadSchedule
from medfed.train.normalization import public_width, stats_ciphertexts

log = logging.getLogger(__name__)


FederationError = M.FederationError  # the federation cannot continue (re-exported)


@dataclass
class AggregatorSettings:
    """What the aggregator knows: public parameters and the schedule, no data."""

    params: CKKSParams
    schedule: HeadSchedule
    n_classes: int
    n_features: int  # embedding width the hospitals announce
    bucket: int
    expected_hospitals: int
    min_hospitals: int = 1
    node_wait_seconds: float = 120.0
    reply_timeout: float | None = None
    workers: int = 0  # Ray encrypted batch workers (0: in-process)
    upload_batch: int = 8  # hospitals per upload wave
    cpus_per_worker: float = 1.0
    components: int = 0  # PCA-whitened features trained on (0: standardized embeddings)
    samples_per_component: int = 0  # fewer components for fewer (padded) samples; 0: all
    signing: SigningKey | None = None  # the aggregator's Ed25519 key, every party's pinned key
    dp: OutputNoise | None = None  # differential privacy: noise inside the final head

    @property
    def stats_ciphertexts(self) -> int:
        """Ciphertexts of one hospital's statistics."""
        return stats_ciphertexts(self.n_features, self.components, self.params.slots)


class EmbeddingsAggregator(RoundExchange):
    """Mode "embeddings", shared key: the whole protocol, written once over a Flower Grid.

    Not a Flower ``Strategy``: the protocol's rounds (``stats``, ``upload``, ``sum-<t>``,
    ``final``) are not Flower's train/evaluate rounds, so it drives the Grid itself, as a
    ServerApp's ``main`` does; ``run(grid)`` returns the run's aggregator-side results.
    """

    def __init__(
        self,
        settings: AggregatorSettings,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.s = settings
        self.ledger = Ledger()
        self.on_step = on_step
        self.names: dict[int, str] = {}
        self.members: list[int] = []  # nodes whose statistics were accepted
        self.contributors: dict[str, list[int]] = {}  # stage -> nodes whose data was used
        self.ctx: ts.Context | None = None
        self.engine: SealEngine | None = None
        self.layout: DiagonalLayout | None = None
        self.noise_rng = secure_rng  # where the DP noise comes from (a test may pass its own)
        self.dp_output: dict | None = None

    # -- plumbing -------------------------------------------------------------------------
    # -- stages ---------------------------------------------------------------------------
    def stats(self, grid: Grid, nodes: Iterable[int]) -> tuple[list[SealVec], dict[int, int]]:
        """Stage ``stats``: add the hospitals' encrypted statistics and load the public keys.

        Returns the encrypted total and each accepted node's bucket count; excludes, with the
        reason, duplicate names, foreign key sets, other embedding widths and bad ciphertexts.
        """
        replies = self.exchange_round(grid, "stats", {n: {} for n in nodes}, M.MSG_STATS)
        claims: dict[str, list[int]] = defaultdict(list)
        for node, rec in replies.items():
            claims[str(rec.get(M.HOSPITAL, ""))].append(node)
        for name, claimants in claims.items():
            if len(claimants) > 1 or not name:  # nobody can tell which node is genuine
                for node in claimants:
                    del replies[node]
                    self.ledger.exclude(
                        "stats",
                        self._name(node),
                        f"{len(claimants)} nodes claim the name {name[:40]!r}; all are "
                        "rejected (each hospital must use its own provisioned name).",
                    )
        for node, rec in replies.items():
            self.names[node] = str(rec[M.HOSPITAL])
        if not replies:  # nobody to take the public keys from: stop with the reasons
            self._check_quorum("stats", 0)
        keys = load_public_keys(self, grid, replies)
        self.ctx, self.engine, fingerprint = keys.ctx, keys.engine, keys.fingerprint
        self.public_bytes, self.galois_bytes = keys.public_bytes, keys.galois_bytes
        self.key_ids = {"aggregator": fingerprint} | {  # the key each party encrypts under
            self.names[node]: str(rec[M.KEY_FINGERPRINT]) for node, rec in replies.items()
        }
        total, buckets = None, {}
        for node, rec in replies.items():
            name = self.names[node]
            if rec[M.KEY_FINGERPRINT] != fingerprint:
                self.ledger.exclude(
                    "stats",
                    name,
                    f"encrypts under a different key set than the public key (from "
                    f"{keys.sender}); re-provision this hospital with the consortium's key.",
                )
                continue
            d = int(rec.get(M.N_FEATURES, self.s.n_features))
            if d != self.s.n_features:
                self.ledger.exclude(
                    "stats",
                    name,
                    f"{name} embeds {d} features, the run uses {self.s.n_features}; embed with "
                    "the consortium's backbone (same --model and --img-size) and rejoin.",
                )
                continue
            try:
                blobs = list(rec[M.STATS])
                if len(blobs) != self.s.stats_ciphertexts:
                    raise CiphertextError(
                        f"{name} sent {len(blobs)} statistics ciphertexts, expected "
                        f"{self.s.stats_ciphertexts}"
                    )
                vec = [self.engine.from_bytes(b, sender=name, item="stats") for b in blobs]
                n_buckets = int(rec[M.BUCKETS])
                if not 0 <= n_buckets <= self.s.params.slots:
                    raise CiphertextError(f"{name} announced {n_buckets} buckets")
            except (CiphertextError, ValueError, TypeError) as e:
                self.ledger.exclude("stats", name, str(e))
                continue
            buckets[node] = n_buckets
            total = vec if total is None else [a + b for a, b in zip(total, vec, strict=True)]
        self.members = sorted(buckets)
        self.contributors["stats"] = list(self.members)
        self._check_quorum("stats", len(buckets))
        return total, buckets

    def _check_quorum(self, stage: str, n: int) -> None:
        """Continue only with ``min_hospitals`` contributors: fewer would train on (and send
        every hospital a head trained on) too few hospitals' data."""
        if n < max(1, self.s.min_hospitals):
            excluded = "; ".join(
                f"{e['hospital']}: {e['reason']}"
                for e in self.ledger.excluded
                if e["stage"] == stage
            )
            raise FederationError(
                f"only {n} hospital(s) contributed usable {stage} data, fewer than the "
                f"{self.s.min_hospitals} needed to continue safely"
                + (f" (excluded: {excluded})" if excluded else "")
            )

    def upload(self, grid: Grid, total: list[SealVec], buckets: dict[int, int]) -> list[Block]:
        """Stage ``upload``: send the total and the slot layout; sum the encrypted blocks.

        Hospitals answer in waves of ``upload_batch``; returns the summed blocks, in block order.
        """
        nodes = sorted(buckets)
        self.layout = layout = plan_diagonal(
            [buckets[n] for n in nodes],
            slots=self.s.params.slots,
            n_classes=self.s.n_classes,
            bucket=self.s.bucket,
            n_features=public_width(
                self.s.n_features,
                self.s.components,
                self.s.bucket * sum(buckets.values()),
                self.s.samples_per_component,
            ),
        )
        layout_json = json.dumps(layout.to_dict())
        total_bytes = [self.engine.to_bytes(v) for v in total]
        payloads = {
            n: {M.STATS_TOTAL: total_bytes, M.LAYOUT: layout_json, M.POSITION: position}
            for position, n in enumerate(nodes)
        }
        G, A, B, H = layout.n_groups, layout.giant, layout.baby, layout.n_heads
        per_block = G * A * B
        sums = BlockSums()
        e = self.engine
        # hospitals upload in waves, folded into the block sums as they arrive, so the
        # aggregator never holds every hospital's ciphertexts at once (100+ hospitals)
        batch = max(1, self.s.upload_batch)
        for start in range(0, len(nodes), batch):
            wave = nodes[start : start + batch]
            replies = self.exchange_round(
                grid, "upload", {n: payloads[n] for n in wave}, M.MSG_UPLOAD
            )
            for position, node in enumerate(nodes):
                if node not in replies:
                    continue
                rec, name = replies[node], self._name(node)
                try:
                    blocks = [int(b) for b in rec[M.BLOCKS]]
                    expected = layout.blocks_of(position)
                    if blocks != expected:
                        raise CiphertextError(f"{name} sent blocks {blocks}, expected {expected}")
                    xs, ms, ys = list(rec[M.FEATURES]), list(rec[M.MASKS]), list(rec[M.LABELS])
                    if (len(xs), len(ms), len(ys)) != (
                        len(blocks) * per_block,
                        len(blocks),
                        len(blocks) * H,
                    ):
                        raise CiphertextError(
                            f"{name} sent {len(xs)}/{len(ms)}/{len(ys)} feature/mask/label "
                            f"ciphertexts, expected {len(blocks) * per_block}/{len(blocks)}/"
                            f"{len(blocks) * H}"
                        )
                    loaded = {
                        blk: (
                            [
                                e.from_bytes(v, sender=name, item="feature")
                                for v in xs[k * per_block : (k + 1) * per_block]
                            ],
                            e.from_bytes(ms[k], sender=name, item="mask"),
                            [
                                e.from_bytes(v, sender=name, item="labels")
                                for v in ys[k * H : (k + 1) * H]
                            ],
                        )
                        for k, blk in enumerate(blocks)
                    }
                except (CiphertextError, KeyError, ValueError) as err:
                    self.ledger.exclude("upload", name, str(err))
                    continue
                self.contributors.setdefault("upload", []).append(node)
                for blk, (x, m, y) in loaded.items():
                    sums.add(blk, x, m, y)
        self._check_quorum("upload", len(self.contributors.get("upload", [])))
        return sums.blocks(layout)

    def train(self, grid: Grid, blocks: list[Block]) -> tuple[list, list]:
        """Train the head on the summed blocks (in-process or on Ray workers).

        Returns the encrypted weights and biases, per head.
        """
        keyholder = FlowerKeyHolder(self, grid)
        backend = EncryptedDiagonalBackend(self.engine, self.layout, keyholder)
        if self.s.workers > 0:
            from medfed.scale.workers import start_workers, stop_workers

            computes = start_workers(
                self.s.workers,
                self.engine,
                self.public_bytes,
                self.galois_bytes,
                self.layout,
                blocks,
                cpus_per_worker=self.s.cpus_per_worker,
            )
        else:
            compute = DiagonalCompute(backend, self.layout)
            compute.blocks = blocks
            computes = [compute]
        try:
            weights = train_diagonal(
                backend,
                computes,
                self.layout,
                self.s.schedule,
                on_step=self.on_step,
            )
        finally:
            if self.s.workers > 0:
                stop_workers(computes)
        self.refresh_records = backend.records
        return weights

    def add_noise(self, weights: tuple[list, list]) -> tuple[list, list]:
        """Differential privacy: Gaussian noise of the head's sensitivity (from the schedule and
        the padded sample count, both public) added inside the head's ciphertexts. The
        aggregator never sees the head; the hospitals never see the noise."""
        L, sch = self.layout, self.s.schedule
        std = self.s.dp.std(sch.lr, sch.l2, sch.epochs, L.n_padded, L.n_heads)
        noise = self.noise_rng().normal(0.0, std, (L.n_features + 1, L.n_heads))
        self.dp_output = {
            "std": std,
            "sensitivity": std / self.s.dp.noise_multiplier,
            "n_padded": L.n_padded,
            "heads": L.n_heads,
        }
        return perturb_head(*weights, L, noise)

    def final(self, grid: Grid, weights: tuple[list, list]) -> list[str]:
        """Stage ``final``: send the encrypted head to every member; returns who evaluated it."""
        w, b = weights
        e = self.engine
        blobs = []
        for wk, bk in zip(w, b, strict=True):
            blobs.extend(e.to_bytes(v) for v in wk)
            blobs.append(e.to_bytes(bk))
        layout_json = json.dumps(self.layout.to_dict())
        payloads = {n: {M.WEIGHTS: blobs, M.LAYOUT: layout_json} for n in self.members}
        replies = self.exchange_round(grid, "final", payloads, M.MSG_FINAL)
        self.contributors["final"] = sorted(replies)
        return [self._name(n) for n in replies]

    def public_parameters(self) -> dict:
        """Which public parameters the run's ciphertexts are under: the CKKS preset, SEAL's
        parameter id of the top level, and the public-key fingerprint of each party (the one a
        hospital announced with its statistics; the aggregator's: the public context it holds).
        A hospital whose fingerprint differs was excluded."""
        return {
            "ckks": self.s.params.name,
            "parms_id": "".join(f"{w:016x}" for w in self.engine.parms_ids[0]),
            "key_by_party": dict(getattr(self, "key_ids", {})),
        }

    def run(self, grid: Grid) -> dict:
        """The whole protocol over ``grid``; returns the aggregator-side results (timings,
        layout, bytes per hospital, rounds, refreshes, exclusions, contributors per stage).
        """
        t0 = time.perf_counter()
        nodes = self.wait_for_nodes(grid)
        total, buckets = self.stats(grid, nodes)
        blocks = self.upload(grid, total, buckets)
        weights = self.train(grid, blocks)
        if self.s.dp is not None:
            weights = self.add_noise(weights)
        evaluated = self.final(grid, weights)
        return {
            "aggregator_seconds": time.perf_counter() - t0,
            "layout": self.layout.to_dict(),
            "evaluated_by": evaluated,
            "bytes_up": {self._name(n): b for n, b in self.ledger.up.items()},
            "bytes_down": {self._name(n): b for n, b in self.ledger.down.items()},
            "received_by_party": self.ledger.audit(self._name),
            "public_parameters": self.public_parameters(),
            # what the stats round told the aggregator: ceil(samples / bucket) per hospital
            "buckets_by_hospital": {self._name(n): int(b) for n, b in buckets.items()},
            "rounds": self.named_rounds(),
            "refreshes": self.refresh_records,
            "dp_output": self.dp_output,  # the noise added inside the head (None: no DP)
            "excluded": self.ledger.excluded,
            # hospitals whose data each stage used: the plaintext references use the same ones
            "contributors": {
                stage: sorted(self._name(n) for n in nodes)
                for stage, nodes in self.contributors.items()
            },
        }


def make_aggregator_app(
    settings: AggregatorSettings, results: dict, on_step: Callable[[int], None] | None = None
) -> ServerApp:
    """A ServerApp running :class:`EmbeddingsAggregator`; fills ``results`` when done."""
    return make_aggregator_server_app(
        lambda: EmbeddingsAggregator(settings, on_step=on_step), results
    )
