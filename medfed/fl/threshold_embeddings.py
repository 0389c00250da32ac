"""Mode "embeddings" under threshold keys: the aggregator trains the head on joint-key ciphertexts.

No hospital holds the whole secret key: OpenFHE's multiparty CKKS gives each hospital a key
share (t-of-n Shamir recovery), and decrypting anything takes every key share. Rounds (each
one Flower round)::

    key-setup ...        the key chain of mode "updates" (context, join, key chain, shares)
    eval-keys-<c>[-lead] round A of the joint rotation / key-switching keys, steps in chunks
    mult-keys            round B: the joint relinearization key
    stats                hospitals -> Enc_joint(feature sums), bucket count; the aggregator adds
    partial-0            the stats total -> sealed partial decryptions, relayed unopened
    upload               the partials + slot layout -> each hospital fuses the total, maps its
                         features and sends its blocks under the joint key
    element-<t>, sum-<t> per epoch: the collective refresh of the weight updates (the lowest
                         live party makes the common random elements; every key share's
                         holder sends its shares; nobody decrypts)
    partial-<E+1>        the trained head -> sealed partial decryptions
    final                the partials -> each hospital fuses the head, evaluates it, acks

A hospital gone mid-run is dropped; a live one recovers its key share (t of n) before the next
refresh or decryption. Imports neither TenSEAL nor torch: runs in the Python 3.10 environment.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medfed.crypto.diagonal import DiagonalLayout, choose_group, pack_diagonal, plan_diagonal
from medfed.crypto.errors import CiphertextError
from medfed.crypto.packing import n_buckets
from medfed.crypto.signing import SigningKey
from medfed.fl import messages as M
from medfed.fl import workspace as W
from medfed.fl.ciphers import aggregator_cipher, hospital_cipher
from medfed.fl.ciphers.framing import frame
from medfed.fl.server_app import Ledger, RoundExchange, log_safe, make_aggregator_server_app
from medfed.fl.updates import add_key_handlers, decrypted_count, hospital_data
from medfed.train.diagonal.backend import Block, BlockSums
from medfed.train.diagonal.epoch import decrypted_head, train_diagonal
from medfed.train.head import HeadSchedule
from medfed.train.normalization import (
    FeatureMap,
    hospital_stats,
    layout_feature_map,
    mapped_features,
    public_width,
    stats_length,
    trained_width,
)

log = logging.getLogger(__name__)


@dataclass
class ThresholdEmbeddingsSettings:
    """What the aggregator knows: public parameters and the schedule, no data."""

    mode: ClassVar[str] = "embeddings"
    keys: ClassVar[str] = "threshold"

    schedule: HeadSchedule
    n_classes: int
    n_features: int
    bucket: int
    expected_hospitals: int
    threshold_preset: str = "training"
    threshold: int | None = None  # t (default: a bare majority)
    min_hospitals: int = 1
    node_wait_seconds: float = 120.0
    reply_timeout: float | None = None
    workers: int = 0  # no Ray batch workers under threshold keys
    # hospitals per upload wave, and ciphertexts (3.7 MB each) per upload message: a local
    # deployment of 5 hospitals on 23 GB lost one to the OOM killer with 5 x 96 at once
    upload_batch: int = 2
    upload_ciphertexts: int = 32
    components: int = 0
    samples_per_component: int = 0
    signing: SigningKey | None = None
    rounds: int = 0  # (mode "updates"' FedAvg rounds; none here)

    @property
    def decryptions(self) -> int:
        """Aggregates decrypted: the statistics and the head (more if a round is redone)."""
        return 4

    @property
    def width(self) -> int:
        """The widest the head trains on (its rotation keys cover every narrower width)."""
        return trained_width(self.n_features, self.components)

    @property
    def stats_length(self) -> int:
        """Values in one hospital's statistics vector."""
        return stats_length(self.n_features, self.components)


def rotation_steps_for(width: int, slots: int) -> list[int]:
    """The rotations the threshold epoch needs keys for, known before any layout: those of
    the group the widest trained width gives (a narrower public width keeps the group)."""
    from medfed.train.diagonal.threshold import rotation_steps_for_group

    return rotation_steps_for_group(*choose_group(width, slots), slots)


class _FlowerRefresher:
    """The backend's refresher: the aggregator cipher's collective refresh over Flower."""

    def __init__(self, aggregator: ThresholdEmbeddingsAggregator) -> None:
        self.aggregator = aggregator

    def refresh(self, ciphertexts: list[bytes], step: int) -> list[bytes]:
        a = self.aggregator
        fresh, live = a.cipher.refresh(a.exchange, a.live, ciphertexts, step)
        a.drop([n for n in a.live if n not in live], f"sum-{step}")
        return fresh


class ThresholdEmbeddingsAggregator(RoundExchange):
    """The untrusted aggregator of mode "embeddings" under threshold keys (public keys only).

    Not a Flower ``Strategy``: it drives the Grid itself, as a ServerApp's ``main`` does.
    """

    def __init__(
        self, settings: ThresholdEmbeddingsSettings, on_step: Callable[[int], None] | None = None
    ) -> None:
        self.s = settings
        self.on_step = on_step
        self.ledger = Ledger()
        self.names: dict[int, str] = {}
        self.cipher = aggregator_cipher("threshold", settings)
        self.live: list[int] = []
        self.dropped: list[dict] = []
        self.contributors: dict[str, list[int]] = {}
        self.layout: DiagonalLayout | None = None
        self._grid: Grid | None = None

    def exchange(self, stage: str, payloads: dict[int, dict], message_type: str) -> dict:
        """One Flower round over this run's grid."""
        return self.exchange_round(self._grid, stage, payloads, message_type, learn_names=True)

    def drop(self, nodes: list[int], stage: str) -> None:
        """Leave ``nodes`` out of the rest of the run (their key shares get recovered)."""
        for n in nodes:
            if n in self.live:
                self.live.remove(n)
                self.dropped.append({"hospital": self._name(n), "stage": stage})
        if len(self.live) < max(1, self.s.min_hospitals):
            raise M.FederationError(
                f"only {len(self.live)} hospitals remain after {stage}; the federation stops"
            )

    # -- stages ---------------------------------------------------------------------------
    def stats(self) -> tuple[bytes, dict[int, int]]:
        """Encrypted statistics and bucket counts; the statistics' sum under the joint key."""
        replies = self.exchange(
            "stats", {n: {M.FL_ROUND: 0} for n in self.live}, M.MSG_THRESHOLD_STATS
        )
        good, buckets = {}, {}
        for node, rec in replies.items():
            name = self._name(node)
            try:
                d = int(rec[M.N_FEATURES])
                if d != self.s.n_features:
                    raise ValueError(
                        f"{name} embeds {d} features, the run uses {self.s.n_features}; embed "
                        "with the consortium's backbone and rejoin"
                    )
                count = int(rec[M.BUCKETS])
                if not 1 <= count <= 1 << 20:
                    raise ValueError(f"{name} announced {count} buckets")
                blob = bytes(rec[M.UPDATE])
                self.cipher.check(blob, sender=name, length=self.s.stats_length)
            except (CiphertextError, KeyError, ValueError) as e:
                self.ledger.exclude("stats", name, log_safe(str(e)))
                continue
            good[node], buckets[node] = blob, count
        self.drop([n for n in self.live if n not in good], "stats")
        self.contributors["stats"] = sorted(good)
        return self.cipher.add([good[n] for n in sorted(good)]), buckets

    def upload(self, material: dict[int, dict], buckets: dict[int, int], engine) -> list[Block]:
        """The slot layout and the statistics' partials out; the blocks' sums back."""
        nodes = [n for n in sorted(buckets) if n in self.live]
        self.layout = layout = plan_diagonal(
            [buckets[n] for n in nodes],
            slots=engine.slots,
            n_classes=self.s.n_classes,
            bucket=self.s.bucket,
            n_features=public_width(
                self.s.n_features,
                self.s.components,
                self.s.bucket * sum(buckets[n] for n in nodes),
                self.s.samples_per_component,
            ),
        )
        layout_json = json.dumps(layout.to_dict())
        G, A, B, H = layout.n_groups, layout.giant, layout.baby, layout.n_heads
        per_block = G * A * B
        sums = BlockSums()
        batch = max(1, self.s.upload_batch)
        failed = []
        for start in range(0, len(nodes), batch):
            wave = nodes[start : start + batch]
            for node, items in self._upload_wave(wave, nodes, material, layout_json).items():
                position, name = nodes.index(node), self._name(node)
                try:
                    blocks, items = items
                    if blocks != layout.blocks_of(position):
                        raise CiphertextError(f"{name} sent blocks {blocks}")
                    nb = len(blocks)
                    expected = nb * (per_block + 1 + H)
                    if len(items) != expected:
                        raise CiphertextError(f"{name} sent {len(items)} of {expected} ciphertexts")
                    xs, ms = items[: nb * per_block], items[nb * per_block : nb * (per_block + 1)]
                    ys = items[nb * (per_block + 1) :]

                    def load(b, item, name=name):
                        return engine.from_bytes(bytes(b), sender=name, item=item)

                    loaded = {
                        blk: (
                            [load(v, "feature") for v in xs[k * per_block : (k + 1) * per_block]],
                            load(ms[k], "mask"),
                            [load(v, "labels") for v in ys[k * H : (k + 1) * H]],
                        )
                        for k, blk in enumerate(blocks)
                    }
                except (CiphertextError, KeyError, ValueError, TypeError) as e:
                    self.ledger.exclude("upload", name, log_safe(str(e)))
                    failed.append(node)
                    continue
                self.contributors.setdefault("upload", []).append(node)
                for blk, (x, m, y) in loaded.items():
                    sums.add(blk, x, m, y)
            done = set(self.contributors.get("upload", []))
            failed += [n for n in wave if n not in done and n not in failed]
        self.drop(failed, "upload")
        return sums.blocks(layout)

    def _upload_wave(
        self, wave: list[int], nodes: list[int], material: dict[int, dict], layout_json: str
    ) -> dict[int, tuple[list[int], list[bytes]]]:
        """Each hospital of ``wave``'s blocks and ciphertexts (feature diagonals, masks,
        labels), in slices of at most ``upload_ciphertexts`` per message (gRPC caps a message
        at 512 MB, and each copy of a message costs memory: a training-preset ciphertext is ~3.7
        MB); slice 0 carries the statistics'
        partial decryptions. A hospital that fails a slice is left out."""
        per = max(1, self.s.upload_ciphertexts)
        got: dict[int, tuple[list[int], list[bytes]]] = {}
        totals: dict[int, int] = {}
        ask = list(wave)
        k = 0
        while ask:
            payloads = {
                n: {
                    M.LAYOUT: layout_json,
                    M.POSITION: nodes.index(n),
                    M.SLICE: k,
                    M.COUNT: per,
                    **(material[n] if k == 0 else {}),
                }
                for n in ask
            }
            replies = self.exchange("upload", payloads, M.MSG_THRESHOLD_UPLOAD)
            for n in ask:
                rec = replies.get(n)
                if rec is None:
                    got.pop(n, None)
                    continue
                try:
                    blocks, items = [int(b) for b in rec[M.BLOCKS]], list(rec[M.FEATURES])
                    total = int(rec[M.COUNT]) if k == 0 else totals[n]
                    if k == 0:
                        totals[n] = total
                        got[n] = (blocks, [])
                    if blocks != got[n][0] or len(items) != min(per, total - k * per):
                        raise CiphertextError(f"slice {k} holds {len(items)} ciphertexts")
                except (CiphertextError, KeyError, ValueError, TypeError) as e:
                    self.ledger.exclude("upload", self._name(n), log_safe(str(e)))
                    got.pop(n, None)
                    continue
                got[n][1].extend(items)
            k += 1
            ask = [n for n in ask if n in got and len(got[n][1]) < totals[n]]
        return got

    def run(self, grid: Grid) -> dict:
        """The whole protocol over ``grid``; returns the aggregator-side results."""
        from medfed.crypto.threshold.evaluator import ThresholdEngine
        from medfed.train.diagonal.compute import DiagonalCompute
        from medfed.train.diagonal.threshold import ThresholdDiagonalBackend

        t0 = time.perf_counter()
        self._grid = grid
        nodes = self.wait_for_nodes(grid)
        self.live = self.cipher.setup(self.exchange, nodes, self.names)
        slots = self.cipher.agg.context.slots
        self.cipher.eval_keys(self.exchange, rotation_steps_for(self.s.width, slots))
        engine = ThresholdEngine(self.cipher.agg)
        setup_seconds = time.perf_counter() - t0

        total, buckets = self.stats()
        material, live = self.cipher.decrypt_material(self.exchange, total, self.live, 0)
        self.drop([n for n in self.live if n not in live], "partial-0")
        blocks = self.upload(material, buckets, engine)
        train_t0 = time.perf_counter()
        backend = ThresholdDiagonalBackend(engine, self.layout, _FlowerRefresher(self))
        compute = DiagonalCompute(backend, self.layout)
        compute.blocks = blocks
        w, b = train_diagonal(backend, [compute], self.layout, self.s.schedule, self.on_step)
        train_seconds = time.perf_counter() - train_t0

        head = [v for wk, bk in zip(w, b, strict=True) for v in (*wk, bk)]
        aggregate = frame([self.cipher.agg.for_decryption(engine.to_bytes(v)) for v in head])
        final_round = self.s.schedule.epochs + 1
        material, live = self.cipher.decrypt_material(
            self.exchange, aggregate, self.live, final_round
        )
        self.drop([n for n in self.live if n not in live], f"partial-{final_round}")
        layout_json = json.dumps(self.layout.to_dict())
        payloads = {n: {M.LAYOUT: layout_json, **material[n]} for n in self.live}
        evaluated = self.exchange("final", payloads, M.MSG_THRESHOLD_FINAL)
        self.contributors["final"] = sorted(evaluated)
        return {
            "aggregator_seconds": time.perf_counter() - t0,
            "setup_seconds": setup_seconds,
            "train_seconds": train_seconds,
            "layout": self.layout.to_dict(),
            "cipher": self.cipher.describe(),
            "public_parameters": self.cipher.public_parameters(),
            "evaluated_by": [self._name(n) for n in sorted(evaluated)],
            "buckets_by_hospital": {self._name(n): int(c) for n, c in buckets.items()},
            "dropped": self.dropped,
            "bytes_up": {self._name(n): v for n, v in self.ledger.up.items()},
            "bytes_down": {self._name(n): v for n, v in self.ledger.down.items()},
            "received_by_party": self.ledger.audit(self._name),
            "rounds": self.named_rounds(),
            "refreshes": [
                {**r, "seconds": rec["seconds"], "bytes_out": rec["bytes_out"]}
                for r, rec in zip(self.cipher.refreshes, backend.records, strict=False)
            ],
            "excluded": self.ledger.excluded,
            "contributors": {
                stage: sorted(self._name(n) for n in nodes)
                for stage, nodes in self.contributors.items()
            },
        }


def make_threshold_embeddings_server_app(
    settings: ThresholdEmbeddingsSettings,
    results: dict,
    on_step: Callable[[int], None] | None = None,
) -> ServerApp:
    """A ServerApp running :class:`ThresholdEmbeddingsAggregator`; fills ``results``."""
    return make_aggregator_server_app(
        lambda: ThresholdEmbeddingsAggregator(settings, on_step=on_step), results
    )


# ------------------------------------------------------------------------------ hospitals


def make_threshold_embeddings_hospital_app(
    workspace: str | Path, mods: list | None = None
) -> ClientApp:
    """The hospitals' ClientApp of mode "embeddings" under threshold keys (node
    ``partition-id`` selects the data). ``mods`` run inside
    :func:`medfed.fl.workspace.authenticate`."""
    workspace = str(workspace)
    app = ClientApp(mods=[W.authenticate(workspace), *(mods or [])])

    def cipher(meta: W.HospitalProvision, i: int):
        return hospital_cipher("threshold", workspace, i)

    def reply(msg: Message, data: W.HospitalData, **values) -> Message:
        return M.make_reply(msg, **{M.HOSPITAL: data.name, **values})

    add_key_handlers(app, workspace)

    @app.query("thresholdstats")
    @W.guarded(workspace, "stats")
    def stats(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        x = data.train_features
        if not len(x) or not np.all(np.isfinite(x)):
            raise ValueError(
                f"{data.name}: no usable training embeddings (empty or NaN/Inf); re-embed the "
                "images before joining the federation"
            )
        c = cipher(meta, i)
        return reply(
            msg,
            data,
            **{
                M.UPDATE: c.encrypt(hospital_stats(x, meta.components) * c.stats_scale),
                M.BUCKETS: n_buckets(len(x), int(meta.bucket)),
                M.N_FEATURES: int(x.shape[1]),
            },
        )

    @app.train("thresholdupload")
    @W.guarded(workspace, "upload")
    def upload(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        rec = msg.content[M.RECORD]
        layout = DiagonalLayout.from_dict(json.loads(rec[M.LAYOUT]))
        norm = W.hospital_dir(Path(workspace), i) / W.NORM
        if int(rec.get(M.SLICE, 0)) == 0:  # the first slice: fuse the statistics total
            d, components = data.train_features.shape[1], meta.components
            length = stats_length(d, components)
            c = cipher(meta, i)
            total = c.decrypt(None, rec, length) / c.stats_scale
            total[length - 1] = decrypted_count(total[length - 1])
            padded = sum(size for _, size in layout.allocations)  # public: the bucket counts
            fmap = layout_feature_map(
                total, d, components, meta.samples_per_component, meta.feature_scale, padded,
                layout.n_features,
            )  # fmt: skip
            np.savez(norm, mean=fmap.mean, projection=fmap.projection)
        else:  # later slices: the feature map the first one made
            with np.load(norm) as f:
                fmap = FeatureMap(f["mean"], f["projection"])
        position = int(rec[M.POSITION])
        if not 0 <= position < len(layout.allocations):
            raise ValueError(f"{data.name}: slot position {position} is outside the layout")
        x = mapped_features(data.train_features, fmap)
        packed = pack_diagonal(x, data.train_labels, layout, position)
        blocks = sorted(packed)
        vectors = [v for b in blocks for v in packed[b].diagonals.reshape(-1, layout.slots)]
        vectors += [packed[b].mask for b in blocks]
        vectors += [t for b in blocks for t in packed[b].targets]
        k, per = int(rec.get(M.SLICE, 0)), int(rec.get(M.COUNT, 0)) or len(vectors)
        part = vectors[k * per : (k + 1) * per]
        if not part:
            raise ValueError(
                f"{data.name}: upload slice {k} is past the {len(vectors)} ciphertexts"
            )
        return reply(
            msg,
            data,
            **{
                M.BLOCKS: blocks,
                M.FEATURES: cipher(meta, i).encrypt_each(part),
                M.COUNT: len(vectors),
            },
        )

    @app.query("refreshelement")
    @W.guarded(workspace, "refresh")
    def element(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        rec = msg.content[M.RECORD]
        return reply(
            msg, data, **cipher(meta, i).refresh_elements(int(rec[M.COUNT]), int(rec[M.STEP]))
        )

    @app.query("refresh")
    @W.guarded(workspace, "refresh")
    def refresh(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        return reply(msg, data, **cipher(meta, i).refresh_shares(msg.content[M.RECORD]))

    @app.evaluate("thresholdfinal")
    @W.guarded(workspace, "final")
    def final(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        rec = msg.content[M.RECORD]
        layout = DiagonalLayout.from_dict(json.loads(rec[M.LAYOUT]))
        per_head = layout.n_groups + 1
        slots = layout.slots
        values = cipher(meta, i).decrypt(None, rec, per_head * layout.n_heads * slots)
        weights = decrypted_head(list(values.reshape(-1, slots)), layout, data.name)
        with np.load(W.hospital_dir(Path(workspace), i) / W.NORM) as f:
            fmap = FeatureMap(f["mean"], f["projection"])
        W.write_evaluation(
            Path(workspace),
            i,
            data.name,
            weights,
            mapped_features(data.test_features, fmap),
            data.test_labels,
            mapped_features(data.train_features, fmap),
            data.train_labels,
        )
        return reply(msg, data, **{M.OK: 1})

    return app
