"""Threshold keys in a real local Flower deployment (flwr 1.30 here): SuperLink with TLS and
SuperNode authentication, one SuperNode per hospital, each hospital's key share stored
encrypted at rest in its own workspace and reloaded by every per-message ClientApp process; a
hospital drops out and its share is recovered. Checked against the in-process run of the same
federation, with the separation evidence and no process left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("openfhe")
pytestmark = [pytest.mark.openfhe, pytest.mark.deployment]

import medfed  # noqa: E402
from medfed.fl.deploy.processes import alive  # noqa: E402
from tests.threshold.test_updates_threshold import make_hospitals  # noqa: E402


def _config(backend: str, **extra) -> medfed.SimulationConfig:
    return medfed.SimulationConfig(
        hospitals=3,
        mode="updates",
        keys="threshold",
        rounds=3,
        dropouts=1,
        backend=backend,
        progress=False,
        **extra,
    )


def test_threshold_deployment_with_a_dropout_matches_the_in_process_run(tmp_path):
    hospitals = make_hospitals(n_hospitals=3, n=360, d=8, n_classes=2, seed=5)
    local = medfed.federate(_config("local"), hospitals)
    deployed = medfed.federate(_config("deploy", audit=True, out=str(tmp_path)), hospitals)
    assert deployed["dropouts"] == 1 and len(deployed["dropped"]) == 1
    assert deployed["threshold"] == local["threshold"]  # t, n, decryptions made
    keys = deployed["public_parameters"]["key_by_party"]  # the joint key, every party
    assert set(keys) == {"aggregator", "hospital-0", "hospital-1", "hospital-2"}
    assert len(set(keys.values())) == 1
    # flooded threshold decryption: both within the context's tolerance of plain FedAvg
    assert abs(deployed["accuracy"] - local["accuracy"]) <= 1 / 180 + 1e-9  # one test sample
    assert abs(deployed["accuracy"] - deployed["plaintext_accuracy"]) <= 0.005
    d = deployed["deployment"]
    assert d["tls"] and d["supernode_auth"] and d["left_running"] == []
    assert not any(alive(p) for p in d["processes"]["serverapp_pids"])
    sep = d["separation"]
    assert sep["hospital_files_seen_open"] == [] and sep["hospital_files_opened"] == []
    assert {"settings.pkl", "signing_key.bin"} <= set(sep["own_files_opened"])
    # per hospital: signing (1), channel (2), at-rest key (1), threshold key share and the
    # Shamir shares held (2 windows each, or 1 for the 64-byte identity)
    assert sep["memory"]["patterns"] >= 3 * 6 and sep["memory"]["found"] == []
    assert (Path(tmp_path) / "deployment" / "superlink.log").exists()


def test_embeddings_under_threshold_keys_run_as_a_deployment(tmp_path):
    """Mode "embeddings" with threshold keys over gRPC: the evaluation-key rounds (in chunks,
    below gRPC's 512 MB), the upload under the joint key and the per-epoch refresh, each a
    message to a per-message ClientApp process that reloads the hospital's key share."""
    from tests.threshold.test_embeddings_threshold import make_hospitals as embedding_hospitals

    hospitals = embedding_hospitals(n_hospitals=3, n=150, d=8, seed=2)
    cfg = medfed.SimulationConfig(
        hospitals=3,
        mode="embeddings",
        keys="threshold",
        epochs=2,
        lr=16.0,
        components=0,
        backend="deploy",
        progress=False,
        out=str(tmp_path),
    )
    local = medfed.federate(cfg.replace(backend="local", out=None), hospitals)
    deployed = medfed.federate(cfg, hospitals)
    assert deployed["excluded"] == [] and deployed["threshold"]["n"] == 3
    assert deployed["refreshes_per_epoch"] == local["refreshes_per_epoch"] > 0
    # the same federation: only the flooding noise of the head's decryption differs
    assert abs(deployed["accuracy"] - local["accuracy"]) <= 2 / 150 + 1e-9
    assert abs(deployed["accuracy"] - deployed["plaintext_accuracy"]) <= 0.02
    d = deployed["deployment"]
    assert d["tls"] and d["supernode_auth"] and d["left_running"] == []
