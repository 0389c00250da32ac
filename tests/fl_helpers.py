"""Small in-process federations for robustness and security tests (LocalGrid, no Ray)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medfed.crypto.context import make_secret_context, secret_context_bytes
from medfed.crypto.params import PRESETS
from medfed.crypto.signing import SigningKey, provision_keys
from medfed.fl import messages as M
from medfed.fl.aggregator import AggregatorSettings, EmbeddingsAggregator
from medfed.fl.faults import fault_mods
from medfed.fl.hospital import make_hospital_app
from medfed.fl.local_grid import LocalGrid
from medfed.fl.workspace import HospitalData, HospitalProvision, provision
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid
from tests.conftest import synthetic_hospitals

#: The only fields of a hospital's final reply (both modes): its name, the ack, the envelope.
ACK_REPLY_FIELDS = {M.HOSPITAL, M.OK, M.ROUND_ID, M.DIGEST, M.SIGNATURE}


PARAMS = PRESETS["fast"]

#: The aggregator's signing key of each provisioned test workspace (the harness's role).
AGGREGATOR_KEYS: dict[str, SigningKey] = {}


def provision_signed(ws: Path, hospitals: list[HospitalData], secret, meta) -> SigningKey:
    """Provision every hospital with ``secret`` (bytes, or a per-index list) and a fresh
    signing key; returns the aggregator's key (also kept in :data:`AGGREGATOR_KEYS`)."""
    ring = provision_keys([h.name for h in hospitals])
    for i, h in enumerate(hospitals):
        key = secret[i] if isinstance(secret, list) else secret
        provision(ws, i, h, key, meta, signing=ring.hospitals[i])
    AGGREGATOR_KEYS[str(ws)] = ring.aggregator
    return ring.aggregator


def provision_all(
    ws: Path, hospitals: list[HospitalData], n_classes: int = 2, secret=None, keys: dict = None
) -> SigningKey:
    """Each hospital's workspace; ``keys`` maps an index to another secret context. Returns
    the aggregator's signing key."""
    secret = secret if secret is not None else make_secret_context(PARAMS)
    meta = HospitalProvision(bucket=32, n_classes=n_classes, ckks="fast", feature_scale=1.0)
    contexts = [secret_context_bytes((keys or {}).get(i, secret)) for i in range(len(hospitals))]
    return provision_signed(ws, hospitals, contexts, meta)


def settings(
    n: int,
    d: int = 8,
    n_classes: int = 2,
    epochs: int = 3,
    min_hospitals: int = 2,
    signing: SigningKey | None = None,
):
    return AggregatorSettings(
        params=PARAMS,
        schedule=HeadSchedule(epochs, 4.0, fit_sigmoid(3, 8.0)),
        n_classes=n_classes,
        n_features=d,
        bucket=32,
        expected_hospitals=n,
        min_hospitals=min_hospitals,
        signing=signing,
    )


def run_local(
    ws: Path,
    n: int,
    *,
    faults=(),
    mods: list[Callable] | None = None,
    grid_cls=LocalGrid,
    **kwargs,
):
    """(strategy, grid, result) of one federation over provisioned workspaces."""
    app = make_hospital_app(ws, mods=fault_mods(faults, mods))
    grid = grid_cls(app, n)
    strategy = EmbeddingsAggregator(settings(n, signing=AGGREGATOR_KEYS[str(ws)], **kwargs))
    return strategy, grid, strategy.run(grid)


def federation(tmp_path: Path, n: int = 3, d: int = 8, seed: int = 0, **kwargs):
    hospitals = synthetic_hospitals(n_hospitals=n, n=50 * n + 7, d=d, seed=seed)
    provision_all(tmp_path, hospitals)
    return hospitals, *run_local(tmp_path, n, d=d, **kwargs)


def rewrite_reply(stage: str, change: Callable[[dict, int], dict]):
    """A hospital-side mod that rewrites its own reply at ``stage`` and re-digests it (a buggy
    or malicious hospital, as opposed to corruption in transit); the hospital's authentication
    mod, outside it, signs the result with the hospital's own key."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        record = msg.content.config_records[M.RECORD]
        if record.get(M.STAGE) != stage or reply.has_error():
            return reply
        index = int(context.node_config["partition-id"])
        values = change(dict(reply.content.config_records[M.RECORD]), index)
        values.pop(M.DIGEST, None)
        values.pop(M.ROUND_ID, None)
        values.pop(M.SIGNATURE, None)
        return M.make_reply(msg, **values)

    return mod


def excluded(result: dict, stage: str | None = None) -> list[dict]:
    return [e for e in result["excluded"] if stage is None or e["stage"] == stage]
