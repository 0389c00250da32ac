"""Hospital workspaces: each hospital's private directory (data, secret key, evaluation).

In the shared-key setup the secret key is provisioned out of band to every hospital (as in
NVIDIA FLARE's provisioning); the aggregator never reads these directories.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SECRET_CONTEXT = "secret_context.bin"
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


def hospital_dir(workspace: Path, index: int) -> Path:
    return Path(workspace) / f"hospital_{index}"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def provision(
    workspace: Path, index: int, data: HospitalData, secret_context: bytes, meta: dict
) -> Path:
    """Write one hospital's private directory (mode 0700, secret key 0600)."""
    d = hospital_dir(workspace, index)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(d / SECRET_CONTEXT, secret_context)
    np.savez(
        d / DATA,
        train_features=data.train_features.astype(np.float32),
        train_labels=data.train_labels.astype(np.int64),
        test_features=data.test_features.astype(np.float32),
        test_labels=data.test_labels.astype(np.int64),
    )
    (d / META).write_text(json.dumps({"name": data.name, **meta}))
    return d


def load_hospital(workspace: Path, index: int) -> tuple[HospitalData, dict]:
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
    return data, meta


def read_secret_context(workspace: Path, index: int) -> bytes:
    return (hospital_dir(workspace, index) / SECRET_CONTEXT).read_bytes()


def read_evaluations(workspace: Path, n: int) -> list[dict | None]:
    """Each hospital's private evaluation result (None where a hospital wrote none)."""
    out = []
    for i in range(n):
        p = hospital_dir(workspace, i) / EVAL
        out.append(json.loads(p.read_text()) if p.exists() else None)
    return out
