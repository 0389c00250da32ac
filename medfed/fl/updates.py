"""Mode "updates": hospitals train locally, the aggregator adds encrypted sample-weighted updates.

:class:`UpdatesAggregator` (the aggregator, a Flower ServerApp's main loop) and
:func:`make_updates_hospital_app` (the hospitals' ClientApp) are written once; the key setup
("none", "shared", "threshold") is the pluggable :mod:`medfed.fl.ciphers` layer.

Rounds (each one Flower round; ``fl_round`` r = 0 .. rounds-1, ``final`` is ``rounds``)::

    key-setup ...          cipher-specific (shared: fingerprints + public context;
                           threshold: context, join, key chain, Shamir shares)
    stats                  hospitals -> Enc([sum x, sum x^2, n]); aggregator adds
    [partial-<r>]          threshold only: aggregate -> hospitals -> sealed partial
                           decryptions, relayed unopened (with Shamir recovery first if a
                           key-share holder dropped out)
    train-<r>              aggregate (+ sealed partials) -> each hospital decrypts it: r = 0
                           the stats (-> global normalization), r > 0 the previous round's
                           sum (-> w = sum(n_i w_i) / sum(n_i)); trains locally from w;
                           replies Enc([n_i * w_i, n_i]); aggregator adds
    final                  the last aggregate -> hospitals decrypt, evaluate on their own
                           test split (eval.json, private) and reply ok

The aggregator sees ciphertexts, public keys and sealed bytes; it never holds a secret key and
never sees an update, the aggregate or a sample count in plaintext (with keys "none" it does:
that is the plain FedAvg baseline). A hospital that does not answer is dropped from the rest
of the run; the others continue (threshold keys: while at least t hospitals remain).

Imports neither TenSEAL nor torch: with threshold keys this runs in the Python 3.10 OpenFHE
environment.
"""

from __future__ import annotations

import functools
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

from medfed.crypto.errors import CiphertextError
from medfed.crypto.signing import SigningKey
from medfed.fl import messages as M
from medfed.fl import workspace as W
from medfed.fl.ciphers import aggregator_cipher, hospital_cipher
from medfed.fl.server_app import Ledger, RoundExchange, log_safe, make_aggregator_server_app
from medfed.privacy.mechanisms import HospitalDP
from medfed.train.local import (
    fedavg_from_sum,
    head_shape,
    train_local,
    train_local_dp,
    update_length,
    weighted_update,
)
from medfed.train.normalization import (
    FeatureMap,
    feature_map_from_stats,
    hospital_stats,
    mapped_features,
    stats_length,
    trained_width,
)

log = logging.getLogger(__name__)


@dataclass
class UpdatesSettings:
    """What the aggregator knows: the schedule and public parameters, no data."""

    mode: ClassVar[str] = "updates"

    keys: str
    rounds: int
    local_epochs: int
    lr: float
    n_classes: int
    n_features: int
    expected_hospitals: int
    ckks: str = "fast"  # keys "shared": the TenSEAL preset (the hospitals' provisioned key)
    threshold_preset: str = "default"  # keys "threshold": medfed.crypto.threshold preset
    threshold: int | None = None  # keys "threshold": t (default: a bare majority)
    min_hospitals: int = 1
    node_wait_seconds: float = 120.0
    reply_timeout: float | None = None
    workers: int = 0  # no Ray batch workers in this mode (launch.py asks)
    components: int = 0  # PCA-whitened features trained on (0: standardized embeddings)
    l2: float = 0.0  # L2 penalty of the hospitals' local training
    signing: SigningKey | None = None  # the aggregator's Ed25519 key, every party's pinned key

    @property
    def width(self) -> int:
        """Features the head trains on."""
        return trained_width(self.n_features, self.components)

    @property
    def head_shape(self) -> tuple[int, int]:
        """``(width + 1, heads)``: the head's weights and bias row."""
        return head_shape(self.width, self.n_classes)

    @property
    def update_length(self) -> int:
        """Values in one hospital's update: the weighted head and its sample count."""
        return update_length(self.width, self.n_classes)

    @property
    def stats_length(self) -> int:
        """Values in one hospital's statistics vector (moments and sample count)."""
        return stats_length(self.n_features, self.components)


class UpdatesAggregator(RoundExchange):
    """Sample-weighted FedAvg in the encrypted domain, over any :mod:`medfed.fl.ciphers` setup.

    Not a Flower ``Strategy`` (its key-setup and statistics rounds are not train/evaluate
    rounds): it drives the Grid itself, as a ServerApp's ``main`` does.
    """

    def __init__(
        self, settings: UpdatesSettings, on_step: Callable[[int], None] | None = None
    ) -> None:
        self.s = settings
        self.on_step = on_step
        self.ledger = Ledger()
        self.names: dict[int, str] = {}
        self.cipher = aggregator_cipher(settings.keys, settings)
        self.live: list[int] = []
        self.participants: list[list[str]] = []  # per round: whose update is in the sum
        self.dropped: list[dict] = []
        self._grid: Grid | None = None

    # -- plumbing -------------------------------------------------------------------------
    def exchange(self, stage: str, payloads: dict[int, dict], message_type: str) -> dict:
        """One Flower round over this run's grid (see :meth:`RoundExchange.exchange_round`)."""
        return self.exchange_round(self._grid, stage, payloads, message_type, learn_names=True)

    def _drop(self, nodes: list[int], stage: str) -> None:
        for n in nodes:
            if n in self.live:
                self.live.remove(n)
                self.dropped.append({"hospital": self._name(n), "stage": stage})
        if len(self.live) < self.s.min_hospitals:
            raise M.FederationError(
                f"only {len(self.live)} hospitals remain after {stage}; the federation stops"
            )

    def _collect(self, stage: str, replies: dict, length: int) -> dict[int, bytes]:
        """Checked contributions by node; the rest is excluded (and dropped from the run)."""
        good: dict[int, bytes] = {}
        for node, rec in replies.items():
            try:
                blob = bytes(rec[M.UPDATE])
                self.cipher.check(blob, sender=self._name(node), length=length)
            except (CiphertextError, KeyError, ValueError) as e:
                self.ledger.exclude(stage, self._name(node), log_safe(str(e)))
                continue
            good[node] = blob
        self._drop([n for n in self.live if n not in good], stage)
        return good

    # -- the protocol ---------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        """Key setup, statistics, ``rounds`` FedAvg rounds and the final evaluation over
        ``grid``; returns the record of the run (bytes, rounds, participants, exclusions)."""
        t0 = time.perf_counter()
        self._grid = grid
        nodes = self.wait_for_nodes(grid)
        self.live = self.cipher.setup(self.exchange, nodes, self.names)
        for node, reason in getattr(self.cipher, "rejected", {}).items():
            self.ledger.exclude("key-setup", self._name(node), reason)
        setup_seconds = time.perf_counter() - t0

        replies = self.exchange(
            "stats", {n: {M.FL_ROUND: 0} for n in self.live}, M.MSG_UPDATE_STATS
        )
        stats = self._collect("stats", replies, self.s.stats_length)
        stats_by = sorted(self._name(n) for n in stats)
        aggregate = self.cipher.add([stats[n] for n in sorted(stats)])
        for r in range(self.s.rounds):
            material, live = self.cipher.decrypt_material(self.exchange, aggregate, self.live, r)
            self._drop([n for n in self.live if n not in live], f"partial-{r}")
            payloads = {
                n: {
                    M.FL_ROUND: r,
                    M.LR: float(self.s.lr),
                    M.L2: float(self.s.l2),
                    M.LOCAL_EPOCHS: int(self.s.local_epochs),
                    **self._aggregate_values(aggregate),
                    **material[n],
                }
                for n in self.live
            }
            replies = self.exchange(f"train-{r}", payloads, M.MSG_LOCAL_TRAIN)
            updates = self._collect(f"train-{r}", replies, self.s.update_length)
            self.participants.append(sorted(self._name(n) for n in updates))
            aggregate = self.cipher.add([updates[n] for n in sorted(updates)])
            if self.on_step:
                self.on_step(r)
        final = self.s.rounds
        material, live = self.cipher.decrypt_material(self.exchange, aggregate, self.live, final)
        self._drop([n for n in self.live if n not in live], "partial-final")
        payloads = {
            n: {M.FL_ROUND: final, **self._aggregate_values(aggregate), **material[n]}
            for n in self.live
        }
        evaluated = self.exchange("final", payloads, M.MSG_UPDATE_FINAL)
        return {
            "aggregator_seconds": time.perf_counter() - t0,
            "setup_seconds": setup_seconds,
            "cipher": self.cipher.describe(),
            "public_parameters": self.cipher.public_parameters() or None,
            "stats_participants": stats_by,
            "participants": self.participants,
            "evaluated_by": [self._name(n) for n in sorted(evaluated)],
            "dropped": self.dropped,
            "bytes_up": {self._name(n): b for n, b in self.ledger.up.items()},
            "bytes_down": {self._name(n): b for n, b in self.ledger.down.items()},
            "received_by_party": self.ledger.audit(self._name),
            "rounds": self.named_rounds(),
            "excluded": self.ledger.excluded,
        }

    def _aggregate_values(self, aggregate: bytes) -> dict:
        # collective decryption: each hospital kept the aggregate from the partial round
        return {} if self.cipher.collective else {M.AGGREGATE: aggregate}


def make_updates_server_app(
    settings: UpdatesSettings, results: dict, on_step: Callable[[int], None] | None = None
) -> ServerApp:
    """A ServerApp running :class:`UpdatesAggregator`; fills ``results`` when done."""
    return make_aggregator_server_app(lambda: UpdatesAggregator(settings, on_step=on_step), results)


# ------------------------------------------------------------------------------ hospitals


@functools.lru_cache(maxsize=64)
def hospital_data(workspace: str, index: int) -> tuple[W.HospitalData, W.HospitalProvision]:
    """Hospital ``index``'s data and provisioning, read once per process."""
    return W.load_hospital(Path(workspace), index)


def _head_from(total: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return fedavg_from_sum(total, shape)[0]


def add_key_handlers(app: ClientApp, workspace: str) -> None:
    """Register a hospital's key-setup and partial-decryption handlers on ``app``: each runs
    the step with the hospital's cipher (:mod:`medfed.fl.ciphers`, the key setup it was
    provisioned with). Mode "embeddings" under threshold keys uses them too."""

    def answer(msg: Message, context: Context, step) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        out = step(hospital_cipher(str(meta.keys), workspace, i), msg.content[M.RECORD])
        return M.make_reply(msg, **{M.HOSPITAL: data.name, **out})

    @app.query("keysetup")
    @W.guarded(workspace, "key-setup")
    def key_setup(msg: Message, context: Context) -> Message:
        return answer(msg, context, lambda c, rec: c.setup(str(rec[M.SETUP_STEP]), rec))

    @app.query("partial")
    @W.guarded(workspace, "partial")
    def partial(msg: Message, context: Context) -> Message:
        def step(c, rec):
            recipients = [int(r) for r in rec[M.RECIPIENTS]]
            return c.partials(bytes(rec[M.AGGREGATE]), recipients, int(rec[M.STEP]))

        return answer(msg, context, step)


def make_updates_hospital_app(workspace: str | Path, mods: list | None = None) -> ClientApp:
    """The hospitals' ClientApp for mode "updates" (node ``partition-id`` selects the data).

    ``mods`` run inside :func:`medfed.fl.workspace.authenticate`, which checks the
    aggregator's signature of every request first and signs every reply.
    """
    workspace = str(workspace)
    app = ClientApp(mods=[W.authenticate(workspace), *(mods or [])])

    def cipher(meta: W.HospitalProvision, i: int):
        return hospital_cipher(str(meta.keys), workspace, i)

    def reply(msg: Message, data: W.HospitalData, **values) -> Message:
        return M.make_reply(msg, **{M.HOSPITAL: data.name, **values})

    add_key_handlers(app, workspace)

    @app.query("updatestats")
    @W.guarded(workspace, "stats")
    def stats(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        x = data.train_features
        if not len(x) or not np.all(np.isfinite(x)):
            raise ValueError(f"{data.name}: no usable training embeddings (empty or NaN/Inf)")
        stats = hospital_stats(x, meta.components, _dp(meta))
        c = cipher(meta, i)
        return reply(msg, data, **{M.UPDATE: c.encrypt(stats * c.stats_scale)})

    def global_head(rec, data, meta, i) -> tuple[np.ndarray, FeatureMap]:
        """Decrypt this request's aggregate: (global head, the shared feature map)."""
        d = data.train_features.shape[1]
        components = meta.components
        shape = head_shape(trained_width(d, components), meta.n_classes)
        aggregate = bytes(rec[M.AGGREGATE]) if M.AGGREGATE in rec else None
        hdir = W.hospital_dir(Path(workspace), i)
        if int(rec[M.FL_ROUND]) == 0:  # the aggregate is the stats sum
            length = stats_length(d, components)
            c = cipher(meta, i)
            total = c.decrypt(aggregate, rec, length) / c.stats_scale
            total[length - 1] = decrypted_count(total[length - 1])
            fmap = feature_map_from_stats(
                total,
                d,
                components,
                meta.feature_scale,
                meta.samples_per_component,
            )
            np.savez(hdir / W.NORM, mean=fmap.mean, projection=fmap.projection)
            w = np.zeros(shape)
        else:
            total = cipher(meta, i).decrypt(aggregate, rec, shape[0] * shape[1] + 1)
            w = _head_from(total, shape)
        with np.load(hdir / W.NORM) as f:
            fmap = FeatureMap(f["mean"], f["projection"])
        return w, fmap

    def features(raw: np.ndarray, fmap: FeatureMap, meta: W.HospitalProvision) -> np.ndarray:
        """The trained features (with DP the feature map takes unit-norm embeddings)."""
        return mapped_features(raw, fmap, unit=_dp(meta) is not None)

    @app.train("local")
    @W.guarded(workspace, "train")
    def local(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        rec = msg.content[M.RECORD]
        w, fmap = global_head(rec, data, meta, i)
        x = features(data.train_features, fmap, meta)
        epochs, lr, l2 = int(rec[M.LOCAL_EPOCHS]), float(rec[M.LR]), float(rec.get(M.L2, 0.0))
        dp = _dp(meta)
        if dp:  # DP gradient descent: the noise is in every step, the update post-processing
            _spend_steps(W.hospital_dir(Path(workspace), i), epochs, dp)
            w = train_local_dp(
                w, x, data.train_labels, meta.n_classes, epochs, lr, l2,
                dp.clip, dp.step_std(), dp.rng(),
            )  # fmt: skip
        else:
            w = train_local(w, x, data.train_labels, meta.n_classes, epochs, lr, l2)
        update = weighted_update(w, len(x))
        return reply(msg, data, **{M.UPDATE: cipher(meta, i).encrypt(update)})

    @app.evaluate("updatefinal")
    @W.guarded(workspace, "final")
    def final(msg: Message, context: Context) -> Message:
        i = M.node_index(context)
        data, meta = hospital_data(workspace, i)
        rec = msg.content[M.RECORD]
        w, fmap = global_head(rec, data, meta, i)
        x = features(data.test_features, fmap, meta)
        train_x = features(data.train_features, fmap, meta)
        W.write_evaluation(
            Path(workspace), i, data.name, w, x, data.test_labels, train_x, data.train_labels
        )
        return reply(msg, data, **{M.OK: 1})

    return app


def _dp(meta: W.HospitalProvision) -> HospitalDP | None:
    """This hospital's differential-privacy provisioning (None: no DP)."""
    return HospitalDP(**meta.dp) if meta.dp else None


DP_STEPS = "dp_steps.txt"


def _spend_steps(hdir: Path, epochs: int, dp: HospitalDP) -> None:
    """Count this hospital's DP local steps; refuse those beyond what its accounting covers,
    whatever the aggregator asks."""
    path = hdir / DP_STEPS
    spent = int(path.read_text()) if path.exists() else 0
    if spent + epochs > dp.steps:
        raise ValueError(
            f"{epochs} more DP local steps would exceed the {dp.steps} the privacy accounting "
            f"covers ({spent} spent): refused"
        )
    path.write_text(str(spent + epochs))


def decrypted_count(value: float) -> float:
    """The securely summed sample count is an integer; refuse a decryption far from one."""
    n = round(float(value))
    if n < 1 or abs(float(value) - n) > 0.25:
        raise CiphertextError(f"the decrypted sample count {value:.3f} is not a positive integer")
    return float(n)
