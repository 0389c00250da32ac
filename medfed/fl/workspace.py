"""Hospital workspaces: each hospital's private directory (data, secret key, evaluation).

In the shared-key setup the secret key is provisioned out of band to every hospital (as in
NVIDIA FLARE's provisioning); the aggregator never reads these directories. A hospital's
failures are written to its own ``errors.log`` (:func:`guarded`); the aggregator learns only
the stage (the same text for every failure of it). Each hospital is also provisioned an
Ed25519 signing key (``signing_key.bin``, 0600) and every party's pinned public key
(``meta.json`` ``pinned``): :func:`authenticate` checks every request and signs every reply
with them.

Imports no Flower at module level (``import medfed`` exposes :class:`HospitalData`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.train.head import accuracy, head_scores

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from medfed.crypto.signing import SigningKey

SECRET_CONTEXT = "secret_context.bin"
SIGNING_KEY = "signing_key.bin"  # the hospital's Ed25519 private key (raw, 32 bytes)
DATA = "data.npz"
META = "meta.json"
EVAL = "eval.json"
NORM = "normalization.npz"
ERRORS = "errors.log"


@dataclass(frozen=True)
class HospitalData:
    """What one hospital holds: embeddings and labels of its own train and test samples."""

    name: str
    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class HospitalProvision:
    """What a hospital is provisioned with besides its data and key (its ``meta.json``).

    Fields left None are not written (they belong to the other mode): ``bucket`` is mode
    "embeddings"' padding granularity, ``keys`` and ``dp`` (differential privacy: the noise
    multiplier and the contributors its noise shares assume) mode "updates"'. ``pinned``: the
    run id and every party's Ed25519 public key
    (:meth:`medfed.crypto.signing.PinnedKeys.to_dict`), set by :func:`provision`.
    """

    n_classes: int
    ckks: str
    feature_scale: float = 1.0
    components: int = 0
    samples_per_component: int = 0
    keys: str | None = None
    bucket: int | None = None
    pinned: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None  # medfed.privacy.mechanisms.HospitalDP (None: no DP)

    def to_dict(self) -> dict[str, Any]:
        """The ``meta.json`` mapping (without the hospital's name), None fields left out."""
        order = ("keys", "bucket", "n_classes", "ckks", "feature_scale", "components")
        data = asdict(self)
        keyed = {k: data.pop(k) for k in order} | data  # the order meta.json always had
        return {k: v for k, v in keyed.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HospitalProvision:
        """Read a ``meta.json`` mapping (its ``name`` is the hospital's, not provisioning)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"name"})
        if unknown:
            raise ValueError(f"unknown provisioning key(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def check_hospitals(hospitals: list[HospitalData], n_classes: int) -> None:
    """Refuse hospital data the federation cannot use, before any key or ciphertext exists.

    Raises :class:`~medfed.data.DatasetError` naming the hospital, the array and the fix.
    """
    from medfed.data.medmnist import DatasetError

    if not hospitals:
        raise DatasetError("no hospitals to federate; give at least one HospitalData")
    names = [h.name for h in hospitals]
    if len(set(names)) != len(names):
        raise DatasetError(
            f"hospital names {names} are not unique; the aggregator tells hospitals apart by "
            "name, so give each one its own."
        )
    d = None
    for h in hospitals:
        for split in ("train", "test"):
            x = np.asarray(getattr(h, f"{split}_features"))
            y = np.asarray(getattr(h, f"{split}_labels"))
            where = f"{h.name}: {split}_features"
            if x.ndim != 2 or (split == "train" and x.shape[0] == 0):
                raise DatasetError(
                    f"{where} has shape {x.shape}; expected (samples, features) with at least "
                    "one training sample. Re-run the embedding step for this hospital."
                )
            d = x.shape[1] if d is None else d
            if x.shape[1] != d:
                raise DatasetError(
                    f"{where} has {x.shape[1]} features, other hospitals have {d}; every "
                    "hospital must embed with the same backbone (same --model and --img-size)."
                )
            if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
                raise DatasetError(
                    f"{where} contains NaN/Inf; delete the feature cache and re-embed, or check "
                    "--weights (a broken checkpoint produces non-finite embeddings)."
                )
            labels = f"{h.name}: {split}_labels"
            if y.shape != (x.shape[0],):
                raise DatasetError(
                    f"{labels} has shape {y.shape}, expected ({x.shape[0]},): one class index "
                    "per sample."
                )
            if y.size and (
                not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes
            ):
                raise DatasetError(
                    f"{labels} must be integer class indices in 0..{n_classes - 1} (found "
                    f"dtype {y.dtype}, range {y.min()}..{y.max()}); fix the labels or the class "
                    "count."
                )


def hospital_dir(workspace: Path, index: int) -> Path:
    """Hospital ``index``'s private directory in ``workspace``."""
    return Path(workspace) / f"hospital_{index}"


_Handler = Callable[["Message", "Context"], "Message"]


def guarded(workspace: str | Path, stage: str) -> Callable[[_Handler], _Handler]:
    """Decorate a hospital's message handler: failure details (which may quote data, e.g.
    sample counts) stay inside the hospital.

    The full error goes to the hospital's private ``errors.log``; the error reply
    (:data:`medfed.fl.messages.APP_RAISED`) is the same for every failure of a stage: it names
    the hospital and the stage, not the error class, which would tell the aggregator whether
    a decryption failed (a ``CiphertextError`` after a range check) or something else did, one
    bit about the decrypted values. It is returned, not raised, so that Flower logs no
    traceback and keeps the node's context.
    """

    def wrap(fn: _Handler) -> _Handler:
        @functools.wraps(fn)
        def handler(msg: Message, context: Context) -> Message:
            try:
                return fn(msg, context)
            except Exception as e:  # noqa: BLE001 - reported without its message
                from medfed.fl import messages as M

                i = M.node_index(context)
                with open(hospital_dir(Path(workspace), i) / ERRORS, "a") as f:
                    f.write(f"{stage}: {type(e).__name__}: {e}\n")
                reason = (  # the same for every failure of this stage: no error class
                    f"hospital-{i}: {stage} failed; details are in the hospital's own errors.log"
                )
                return M.error_reply(msg, M.APP_RAISED, reason)

        return handler

    return wrap


_ANSWERED = "medfed.answered"  # ConfigRecord in the node's Context.state: round ids answered


def authenticate(workspace: str | Path) -> Callable:
    """The hospital's authentication, a Flower client mod that both app factories put first
    (outermost) in their ClientApp's ``mods=``: every request passes through it.

    Before anything else runs (other mods included), the request must carry the aggregator's
    signature under the key pinned at provisioning, for this run and this node
    (:func:`medfed.fl.messages.verify_request`), and a round id this hospital has not answered
    yet; otherwise the reply is an :data:`~medfed.fl.messages.APP_RAISED` error and the
    details go to the hospital's ``errors.log``. Every reply with a record leaves signed by
    this hospital's key (:func:`medfed.fl.messages.sign_reply`).
    """
    workspace = str(workspace)

    def mod(msg: Message, context: Context, call_next: _Handler) -> Message:
        from flwr.app import ConfigRecord

        from medfed.crypto.signing import SignatureError
        from medfed.fl import messages as M

        i = M.node_index(context)
        seen = context.state.config_records.get(_ANSWERED)
        answered = list(seen["ids"]) if seen is not None else []
        try:
            key = load_signing_key(workspace, i)
            M.verify_request(msg, key.pinned, context.node_id)
            round_id = str(msg.content[M.RECORD][M.ROUND_ID])
            if round_id in answered:
                raise M.ProtocolError(f"round id {round_id[:40]!r} was answered before: a replay")
        except (SignatureError, M.ProtocolError, KeyError, ValueError) as e:
            try:
                with open(hospital_dir(Path(workspace), i) / ERRORS, "a") as f:
                    f.write(f"refused a request: {type(e).__name__}: {e}\n")
            except OSError:
                pass  # no workspace to log to: the reply still refuses
            reason = (
                f"hospital-{i}: refused a request that fails the aggregator's signature check; "
                "details are in the hospital's own errors.log"
            )
            return M.error_reply(msg, M.APP_RAISED, reason)
        context.state[_ANSWERED] = ConfigRecord({"ids": [*answered, round_id]})
        reply = call_next(msg, context)
        if reply.has_error() or M.RECORD not in reply.content.config_records:
            return reply
        return M.sign_reply(msg, reply, key)

    return mod


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def provision(
    workspace: Path,
    index: int,
    data: HospitalData,
    secret_context: bytes | None,
    meta: HospitalProvision | dict[str, Any],
    signing: SigningKey | None = None,
) -> Path:
    """Write one hospital's private directory (mode 0700, secret and signing keys 0600).

    ``secret_context`` None: no provisioned key (mode "updates" with keys "none" or
    "threshold", where the hospitals make their key shares themselves). ``meta`` (a plain
    dict is written as given) becomes ``meta.json``, with the hospital's name. ``signing``:
    this hospital's key (:func:`medfed.crypto.signing.provision_keys`), written to
    ``signing_key.bin``, its pinned keys to ``meta.json``; without one the hospital refuses
    every request.
    """
    if isinstance(meta, HospitalProvision):
        meta = meta.to_dict()
    d = hospital_dir(workspace, index)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if secret_context is not None:
        write_private(d / SECRET_CONTEXT, secret_context)
    if signing is not None:
        if signing.name != data.name:
            raise ValueError(f"the signing key of {signing.name!r} given to {data.name!r}")
        write_private(d / SIGNING_KEY, signing.private)
        meta = {**meta, "pinned": signing.pinned.to_dict()}
    np.savez(
        d / DATA,
        train_features=data.train_features.astype(np.float32),
        train_labels=data.train_labels.astype(np.int64),
        test_features=data.test_features.astype(np.float32),
        test_labels=data.test_labels.astype(np.int64),
    )
    (d / META).write_text(json.dumps({"name": data.name, **meta}))
    return d


def load_hospital(workspace: Path, index: int) -> tuple[HospitalData, HospitalProvision]:
    """Hospital ``index``'s data and its typed provisioning (``meta.json``)."""
    d = hospital_dir(workspace, index)
    meta = json.loads((d / META).read_text())
    with np.load(d / DATA) as f:
        data = HospitalData(
            meta["name"],
            f["train_features"].astype(np.float64),
            f["train_labels"],
            f["test_features"].astype(np.float64),
            f["test_labels"],
        )
    return data, HospitalProvision.from_dict(meta)


def load_provision(workspace: Path, index: int) -> HospitalProvision:
    """The typed provisioning of one hospital (its ``meta.json``)."""
    meta = json.loads((hospital_dir(workspace, index) / META).read_text())
    return HospitalProvision.from_dict(meta)


def load_signing_key(workspace: str | Path, index: int) -> SigningKey:
    """Hospital ``index``'s signing key with its pinned keys (loaded once per file version).

    Raises :class:`~medfed.crypto.signing.SignatureError` when it was provisioned none.
    """
    path = hospital_dir(Path(workspace), index) / SIGNING_KEY
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        from medfed.crypto.signing import SignatureError

        raise SignatureError(
            f"hospital-{index} has no signing key ({SIGNING_KEY}): provision it with its key "
            "from medfed.crypto.signing.provision_keys"
        ) from None
    return _signing_key(str(workspace), int(index), stamp)


@functools.lru_cache(maxsize=64)
def _signing_key(workspace: str, index: int, stamp: int) -> SigningKey:
    from medfed.crypto.signing import PinnedKeys, SigningKey

    d = hospital_dir(Path(workspace), index)
    meta = json.loads((d / META).read_text())
    pinned = PinnedKeys.from_dict(meta.get("pinned") or {})
    return SigningKey(str(meta["name"]), (d / SIGNING_KEY).read_bytes(), pinned)


def read_secret_context(workspace: Path, index: int) -> bytes:
    """Hospital ``index``'s provisioned secret CKKS context (serialized)."""
    return (hospital_dir(workspace, index) / SECRET_CONTEXT).read_bytes()


def write_evaluation(
    workspace: Path,
    index: int,
    name: str,
    weights: np.ndarray,
    x: np.ndarray,
    labels,
    train_x: np.ndarray | None = None,
    train_labels=None,
) -> None:
    """A hospital's private evaluation of the final head on its test split (``eval.json``).

    Besides the counts it keeps the per-sample ``scores`` (``(total, heads)``, as
    :func:`~medfed.train.head.head_scores` gives them) and ``labels``, so that a
    simulation harness playing every party can pool them into an AUC. With ``train_x`` it
    also records ``max_abs_z``, the largest ``|score|`` on its own training data (training
    used a polynomial sigmoid, which is valid only on its range), and ``train_scores`` /
    ``train_labels`` (the harness's membership-inference attack uses them as members).
    """
    acc = accuracy(weights, x, labels) if len(x) else float("nan")
    result = {
        "hospital": name,
        "correct": int(round(acc * len(x))) if len(x) else 0,
        "total": len(x),
        "weights": weights.tolist(),
        "scores": head_scores(weights, x).tolist(),
        "labels": np.asarray(labels).reshape(-1).astype(np.int64).tolist(),
    }
    if train_x is not None and len(train_x):
        train_scores = head_scores(weights, train_x)
        result["max_abs_z"] = float(np.abs(train_scores).max())
        result["train_scores"] = train_scores.tolist()
        if train_labels is not None:
            labels_ = np.asarray(train_labels).reshape(-1).astype(np.int64).tolist()
            result["train_labels"] = labels_
    (hospital_dir(workspace, index) / EVAL).write_text(json.dumps(result))


def read_evaluations(workspace: Path, n: int) -> list[dict | None]:
    """Each hospital's private evaluation result (None where a hospital wrote none)."""
    out = []
    for i in range(n):
        p = hospital_dir(workspace, i) / EVAL
        out.append(json.loads(p.read_text()) if p.exists() else None)
    return out
