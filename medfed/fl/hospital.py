"""The hospital: a Flower ClientApp that holds the data and the secret key.

Each handler loads this hospital's private workspace (cached per process), answers one
protocol step, and returns only ciphertexts, a bucket count, names and fingerprints.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed.crypto.context import (
    CiphertextError,
    context_fingerprint,
    load_secret_context,
    public_context_bytes,
)
from medfed.crypto.diagonal import DiagonalLayout, choose_group, pack_diagonal, rotation_steps
from medfed.crypto.packing import n_buckets
from medfed.crypto.seal import SealEngine
from medfed.fl import messages as M
from medfed.fl import workspace as W
from medfed.privacy.mechanisms import HospitalDP
from medfed.train.diagonal.epoch import decrypted_head
from medfed.train.diagonal.keyholder import hospital_sums
from medfed.train.normalization import (
    FeatureMap,
    hospital_stats,
    layout_feature_map,
    mapped_features,
    stats_ciphertexts,
    trained_width,
)

log = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def _load(workspace: str, index: int):
    data, meta = W.load_hospital(Path(workspace), index)
    ctx = load_secret_context(W.read_secret_context(Path(workspace), index))
    return data, meta, ctx


def _reply(msg: Message, **values) -> Message:
    return M.make_reply(msg, **values)  # echoes the round id, adds the digest


@lru_cache(maxsize=64)
def _engine(workspace: str, index: int) -> SealEngine:
    """This hospital's SEAL engine, built once per process from its secret context."""
    return SealEngine(_load(workspace, index)[2])


def _layout(rec) -> DiagonalLayout:
    return DiagonalLayout.from_dict(json.loads(rec[M.LAYOUT]))


def make_hospital_app(workspace: str | Path, mods: list | None = None) -> ClientApp:
    """A ClientApp whose node ``partition-id`` selects ``workspace/hospital_<id>``.

    ``mods`` are Flower client-side mods wrapped around every handler (e.g.
    :func:`medfed.fl.faults.fault_mod`), inside :func:`medfed.fl.workspace.authenticate`,
    which checks the aggregator's signature of every request first and signs every reply.
    """
    workspace = str(workspace)
    app = ClientApp(mods=[W.authenticate(workspace), *(mods or [])])

    @app.query("stats")
    @W.guarded(workspace, "stats")
    def stats(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta, ctx = _load(workspace, i)
        engine = _engine(workspace, i)
        features = data.train_features
        if not np.all(np.isfinite(features)):
            raise ValueError(
                f"{data.name}: embeddings contain NaN/Inf; re-embed the images (clear the "
                "feature cache) before joining the federation."
            )
        stats = hospital_stats(features, meta.components, _dp(meta))
        values = {
            M.HOSPITAL: data.name,
            M.BUCKETS: n_buckets(len(features), int(meta.bucket)),
            M.STATS: [engine.encrypt_bytes(v) for v in stats_chunks(stats, engine.slots)],
            M.KEY_FINGERPRINT: context_fingerprint(ctx),
            M.N_FEATURES: int(features.shape[1]),
        }
        if i == 0:
            values.update(_public_material(engine, ctx, _width(features.shape[1], meta)))
        return _reply(msg, **values)

    @app.query("publiccontext")
    @W.guarded(workspace, "public-context")
    def public_context(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta, ctx = _load(workspace, i)
        width = _width(data.train_features.shape[1], meta)
        values = _public_material(_engine(workspace, i), ctx, width)
        return _reply(msg, **{M.HOSPITAL: data.name, **values})

    @app.train("upload")
    @W.guarded(workspace, "upload")
    def upload(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta, ctx = _load(workspace, i)
        engine = _engine(workspace, i)
        rec = msg.content[M.RECORD]
        layout = _layout(rec)
        d = data.train_features.shape[1]
        components = meta.components
        blobs = list(rec[M.STATS_TOTAL])
        if len(blobs) != stats_ciphertexts(d, components, engine.slots):
            raise CiphertextError(f"the statistics total has {len(blobs)} ciphertexts")
        total = np.concatenate(
            [engine.decrypt(engine.from_bytes(b, sender="aggregator", item="stats")) for b in blobs]
        )
        padded = sum(size for _, size in layout.allocations)  # public: the bucket counts
        fmap = layout_feature_map(
            total, d, components, meta.samples_per_component, meta.feature_scale, padded,
            layout.n_features,
        )  # fmt: skip
        np.savez(
            W.hospital_dir(Path(workspace), i) / W.NORM, mean=fmap.mean, projection=fmap.projection
        )
        x = trained_features(data.train_features, fmap, _dp(meta))
        position = int(rec[M.POSITION])
        if not 0 <= position < len(layout.allocations):
            raise ValueError(f"{data.name}: slot position {position} is outside the layout")
        packed = pack_diagonal(x, data.train_labels, layout, position)
        blocks, xs, masks, ys = [], [], [], []
        for block, b in sorted(packed.items()):
            blocks.append(block)
            xs.extend(engine.encrypt_bytes(v) for v in b.diagonals.reshape(-1, layout.slots))
            masks.append(engine.encrypt_bytes(b.mask))
            ys.extend(engine.encrypt_bytes(t) for t in b.targets)
        return _reply(
            msg,
            **{
                M.HOSPITAL: data.name,
                M.BLOCKS: blocks,
                M.FEATURES: xs,
                M.MASKS: masks,
                M.LABELS: ys,
            },
        )

    @app.query("sum")
    @W.guarded(workspace, "sum")
    def sums(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta, _ = _load(workspace, i)
        rec = msg.content[M.RECORD]
        out = hospital_sums(_engine(workspace, i), list(rec[M.MASKED]), _layout(rec))
        return _reply(msg, **{M.HOSPITAL: data.name, M.SUMS: out})

    @app.evaluate("final")
    @W.guarded(workspace, "final")
    def final(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta, _ = _load(workspace, i)
        engine = _engine(workspace, i)
        rec = msg.content[M.RECORD]
        layout = _layout(rec)
        blobs = list(rec[M.WEIGHTS])
        per_head = layout.n_groups + 1
        if len(blobs) != per_head * layout.n_heads:
            raise CiphertextError(f"expected {per_head * layout.n_heads} head ciphertexts")
        vals = [
            engine.decrypt(engine.from_bytes(b, sender="aggregator", item="head")) for b in blobs
        ]
        weights = decrypted_head(vals, layout, data.name)
        with np.load(W.hospital_dir(Path(workspace), i) / W.NORM) as f:
            fmap = FeatureMap(f["mean"], f["projection"])
        dp = _dp(meta)
        x = trained_features(data.test_features, fmap, dp)
        train_x = trained_features(data.train_features, fmap, dp)
        W.write_evaluation(
            Path(workspace), i, data.name, weights, x, data.test_labels, train_x, data.train_labels
        )
        return _reply(msg, **{M.HOSPITAL: data.name, M.OK: 1})

    return app


def _dp(meta: W.HospitalProvision) -> HospitalDP | None:
    """The DP this hospital was provisioned with (None: none)."""
    return HospitalDP(**meta.dp) if meta.dp else None


def trained_features(raw: np.ndarray, fmap: FeatureMap, dp: HospitalDP | None) -> np.ndarray:
    """What the head trains on (and is evaluated on): with DP, the unit-norm embeddings'
    mapped rows clipped to ``dp.clip`` (:func:`mapped_features`)."""
    return mapped_features(raw, fmap, unit=dp is not None, clip=dp.clip if dp else None)


def _width(d: int, meta: W.HospitalProvision) -> int:
    """The widest the head can train on (the run's ``components``); a narrower
    :func:`public_width` of at least ``MIN_ACTIVE`` uses the same group and Galois steps."""
    return trained_width(d, meta.components)


def stats_chunks(vector: np.ndarray, slots: int) -> list[np.ndarray]:
    """``vector`` cut into slot-sized pieces, the last one zero-padded (one ciphertext each)."""
    n = max(1, -(-len(vector) // slots))  # == stats_ciphertexts for a stats vector
    padded = np.zeros(n * slots)
    padded[: len(vector)] = vector
    return list(padded.reshape(n, slots))


def _public_material(engine: SealEngine, ctx, n_features: int) -> dict:
    """What the aggregator needs: public + relinearization keys, Galois keys for its steps."""
    return {
        M.PUBLIC_CONTEXT: public_context_bytes(ctx),
        M.GALOIS_KEYS: engine.make_galois_keys(
            rotation_steps(*choose_group(n_features, engine.slots))
        ),
    }
