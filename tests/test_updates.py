"""Mode "updates": FedAvg over encrypted sample-weighted updates (keys "none" and "shared").

Tolerances: keys "none" is plain FedAvg through the protocol, so the federated head equals the
in-process reference up to float64 summation order (1e-9). With the shared CKKS key ("fast"
preset, scale 2^40) each encrypted sum carries ~1e-9 absolute error per value, divided by the
total sample count when averaging; over a few rounds the head stays within 1e-4 of plain
FedAvg, and the test predictions are identical. Threshold keys: tests/threshold/. Features
files (``--features``): test_features_file.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import tenseal as ts

from medfed.config import ConfigError, SimulationConfig
from medfed.crypto.context import KeyMaterialError, make_secret_context, secret_context_bytes
from medfed.crypto.params import PRESETS
from medfed.experiments.updates_reference import fedavg_reference
from medfed.experiments.yardsticks import YARDSTICK_KEYS
from medfed.fl import messages as M
from medfed.fl.ciphers import UPDATE_CIPHERS, chunk_sizes, frame, unframe
from medfed.fl.faults import dropout_faults, fault_mods
from medfed.fl.local_grid import LocalGrid
from medfed.fl.updates import UpdatesAggregator, UpdatesSettings, make_updates_hospital_app
from medfed.fl.workspace import read_evaluations
from medfed.modes.updates import federate_updates
from medfed.train.local import fedavg_from_sum, train_local, weighted_update
from medfed.train.reference import train_exact_logreg
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import ACK_REPLY_FIELDS, provision_signed

ROUNDS, LOCAL_EPOCHS, LR = 3, 2, 2.0
DESCRIBED = {"dataset": "synthetic", "backbone": "none", "backbone_weights": "none"}


def hospitals_f32(**kwargs):
    """Synthetic hospitals whose features survive the workspace's float32 storage exactly."""
    return [
        replace(
            h,
            train_features=h.train_features.astype(np.float32).astype(np.float64),
            test_features=h.test_features.astype(np.float32).astype(np.float64),
        )
        for h in synthetic_hospitals(**kwargs)
    ]


def federation(tmp_path, keys, hospitals, n_classes, dropouts=None, rounds=ROUNDS):
    """Provision workspaces, run the aggregator on a LocalGrid; (aggregator, grid, result).

    ``dropouts``: hospital index -> FedAvg round from which it answers nothing."""
    d = hospitals[0].train_features.shape[1]
    secret = None
    if keys == "shared":
        secret = secret_context_bytes(make_secret_context(PRESETS["fast"]))
    meta = {"keys": keys, "n_classes": n_classes, "ckks": "fast", "feature_scale": 1.0}
    signing = provision_signed(tmp_path, hospitals, secret, meta)
    settings = UpdatesSettings(
        keys=keys,
        rounds=rounds,
        local_epochs=LOCAL_EPOCHS,
        lr=LR,
        n_classes=n_classes,
        n_features=d,
        expected_hospitals=len(hospitals),
        signing=signing,
    )
    mods = fault_mods(dropout_faults(dropouts or {}))
    grid = LocalGrid(make_updates_hospital_app(tmp_path, mods=mods), len(hospitals))
    strategy = UpdatesAggregator(settings)
    result = strategy.run(grid)
    return strategy, grid, result


def reference_for(hospitals, n_classes, result, rounds=ROUNDS):
    index = {h.name: i for i, h in enumerate(hospitals)}
    return fedavg_reference(
        hospitals,
        n_classes,
        rounds,
        LOCAL_EPOCHS,
        LR,
        participants=[[index[n] for n in names] for names in result["participants"]],
        evaluators=[index[n] for n in result["evaluated_by"]],
    )


def _values(reply):
    for key, value in reply.content[M.RECORD].items():
        for item in value if isinstance(value, list) else [value]:
            yield key, item


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    hospitals = hospitals_f32(n_hospitals=3, n=301, d=9, n_classes=3, seed=5)
    ws = tmp_path_factory.mktemp("ws")
    strategy, grid, result = federation(ws, "shared", hospitals, 3)
    return strategy, grid, result, hospitals, ws


# --- arithmetic -------------------------------------------------------------------------------


def test_local_training_from_zero_is_exact_logistic_regression():
    h = hospitals_f32(n_hospitals=1, n=120, d=5, n_classes=3, seed=1)[0]
    w0 = np.zeros((6, 3))
    ours = train_local(w0, h.train_features / 10, h.train_labels, 3, 7, 0.5)
    exact = train_exact_logreg(h.train_features / 10, h.train_labels, 3, 7, 0.5)
    np.testing.assert_allclose(ours, exact, atol=1e-12)


def test_fedavg_from_sum_divides_by_the_summed_count_and_refuses_garbage():
    a, b = np.ones((3, 2)), 3 * np.ones((3, 2))
    w, n = fedavg_from_sum(weighted_update(a, 10) + weighted_update(b, 30), (3, 2))
    assert n == 40
    np.testing.assert_allclose(w, 2.5 * np.ones((3, 2)))
    with pytest.raises(ValueError, match="not a positive integer"):
        fedavg_from_sum(np.r_[np.zeros(6), 39.5], (3, 2))


def test_frame_roundtrip_and_chunking():
    parts = [b"a", b"", b"xyz" * 100]
    assert unframe(frame(parts)) == parts
    assert chunk_sizes(10, 4) == [4, 4, 2] and chunk_sizes(3, 4) == [3]
    with pytest.raises(ValueError, match="bad magic"):
        unframe(b"garbage")
    with pytest.raises(ValueError, match="truncated|trailing"):
        unframe(frame(parts)[:-1])


def test_the_registry_names_every_key_setup():
    assert set(UPDATE_CIPHERS) == {"none", "shared", "threshold"}


# --- federation equals plain FedAvg -------------------------------------------------------------


@pytest.mark.parametrize("keys", ["none", "shared"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_federated_head_equals_plain_fedavg(tmp_path, keys, n_classes):
    hospitals = hospitals_f32(n_hospitals=3, n=257, d=8, n_classes=n_classes, seed=n_classes)
    _, _, result = federation(tmp_path, keys, hospitals, n_classes)
    ref = reference_for(hospitals, n_classes, result)
    evals = read_evaluations(tmp_path, 3)
    atol = 1e-9 if keys == "none" else 1e-4
    for e in evals:  # every hospital decrypted the same head: plain FedAvg's, within atol
        np.testing.assert_allclose(np.array(e["weights"]), ref["plaintext_weights"], atol=atol)
    acc = sum(e["correct"] for e in evals) / sum(e["total"] for e in evals)
    assert acc == pytest.approx(ref["plaintext_accuracy"], abs=1e-12)
    assert np.abs(ref["plaintext_weights"]).max() > 0.05  # the head did learn something


def test_federate_updates_metrics(tmp_path):
    hospitals = hospitals_f32(n_hospitals=3, n=230, d=6, n_classes=2, seed=3)
    cfg = SimulationConfig(
        hospitals=3,
        mode="updates",
        keys="shared",
        rounds=2,
        local_epochs=2,
        backend="local",
        progress=False,
        out=str(tmp_path / "run"),
    )
    m = federate_updates(cfg, hospitals, 2, dict(DESCRIBED))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "mode",
        "keys",
        "hospitals",
        *YARDSTICK_KEYS,
        "rounds",
        "local_epochs",
        "dropouts",
        "threshold",
        "wall_seconds",
        "bytes_up",
        "bytes_down",
        "bytes_per_party",
        "received_by_party",
        "bytes_per_round",
        "excluded",
    ):
        assert key in saved, key
    assert (m["mode"], m["keys"], m["rounds"], m["dropouts"]) == ("updates", "shared", 2, 0)
    assert abs(m["accuracy_gap_pp"]) <= 0.5 and m["threshold"] is None
    assert "exact_accuracy" not in saved and m["approximation_gap_pp"] == m["accuracy_gap_pp"]
    assert m["encryption_cost_pp"] == pytest.approx(100 * (m["reference_accuracy"] - m["accuracy"]))
    assert abs(m["auc"] - m["plaintext_auc"]) <= 0.01
    assert m["bytes_per_round"]["sent"] > 100_000  # ciphertexts, not floats
    assert set(m["bytes_per_party"]) == {"hospital-0", "hospital-1", "hospital-2", "aggregator"}
    # the per-party audit: updates reach the aggregator, and the aggregate the hospitals, as
    # binary (framed ciphertexts) only
    audit = m["received_by_party"]
    assert audit["aggregator"]["train"]["fields"]["update"] == "binary"
    assert {audit[f"hospital-{i}"]["train"]["fields"]["aggregate"] for i in range(3)} == {"binary"}
    # every party encrypts under the lead's public key (one fingerprint)
    keys = m["public_parameters"]["key_by_party"]
    assert set(keys) == set(m["bytes_per_party"]) and len(set(keys.values())) == 1
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "rounds.jsonl").open()]
    assert stages[:3] == ["key-setup", "public-context", "stats"]
    assert stages[-1] == "final" and "train-1" in stages


# --- what the aggregator holds and sees ---------------------------------------------------------


def test_aggregator_holds_only_the_public_context(shared_run):
    strategy, *_ = shared_run
    ctx = strategy.cipher.ctx
    assert not ctx.is_private()
    with pytest.raises(ValueError, match="(?i)secret key"):
        ctx.secret_key()


ALLOWED_REPLY_KEYS = {
    M.HOSPITAL,
    M.KEY_FINGERPRINT,
    M.PUBLIC_CONTEXT,
    M.UPDATE,
    M.OK,
    M.ROUND_ID,
    M.DIGEST,
    M.SIGNATURE,  # Ed25519, 64 bytes (tests/test_signatures.py)
}


def test_every_reply_is_public_material_or_ciphertext(shared_run):
    strategy, grid, _, hospitals, _ = shared_run
    s = strategy.s
    counts = {len(h.train_labels) for h in hospitals} | {len(h.test_labels) for h in hospitals}
    n_updates = 0
    for reply in grid.received:
        record = reply.content[M.RECORD]
        assert set(record.keys()) <= ALLOWED_REPLY_KEYS
        for key, item in _values(reply):
            assert isinstance(item, bytes | str | int), (key, type(item))
            assert not isinstance(item, float), key  # no plaintext numbers at all
            if isinstance(item, int):
                assert item not in counts, f"{key}={item} equals a hospital's sample count"
            if key == M.PUBLIC_CONTEXT:
                assert not ts.context_from(item).is_private()
            elif key == M.SIGNATURE:  # checked against the hospital's pinned key in the run
                assert isinstance(item, bytes) and len(item) == 64
            elif key == M.UPDATE:  # parses as CKKS ciphertexts under the run's parameters
                length = s.stats_length if record[M.ROUND_ID].startswith("stats") else None
                strategy.cipher.check(item, sender="test", length=length or s.update_length)
                n_updates += 1
    assert n_updates == 3 * (1 + ROUNDS)  # stats + one update per round, per hospital


def test_the_aggregator_cannot_decrypt_an_update_or_the_aggregate(shared_run):
    strategy, grid, *_ = shared_run
    ctx = strategy.cipher.ctx
    update = next(item for r in grid.received for k, item in _values(r) if k == M.UPDATE)
    aggregate = next(
        m.content[M.RECORD][M.AGGREGATE]
        for m in reversed(grid.sent)
        if M.AGGREGATE in m.content[M.RECORD]
    )
    for blob in (update, aggregate):
        for part in unframe(blob):
            vec = ts.ckks_vector_from(ctx, part)
            with pytest.raises(ValueError, match="(?i)secret.key"):
                vec.decrypt()
            from medfed.crypto.context import decrypt

            with pytest.raises(KeyMaterialError, match="secret"):
                decrypt(ctx, vec)


def test_hospitals_evaluate_privately_and_reply_only_an_ack(shared_run):
    _, grid, result, *_ = shared_run
    finals = [r for r in grid.received if M.OK in r.content[M.RECORD]]
    assert len(finals) == 3 and len(result["evaluated_by"]) == 3
    for r in finals:
        assert set(r.content[M.RECORD].keys()) == ACK_REPLY_FIELDS


# --- dropouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", ["none", "shared"])
def test_a_hospital_that_stops_answering_mid_training_does_not_stop_the_run(tmp_path, keys):
    hospitals = hospitals_f32(n_hospitals=4, n=401, d=7, n_classes=2, seed=8)
    strategy, _, result = federation(tmp_path, keys, hospitals, 2, dropouts={2: 2}, rounds=4)
    assert [d["hospital"] for d in result["dropped"]] == ["hospital-2"]
    assert [len(p) for p in result["participants"]] == [4, 4, 3, 3]
    assert "hospital-2" not in result["evaluated_by"] and len(result["evaluated_by"]) == 3
    ref = reference_for(hospitals, 2, result, rounds=4)
    for e in read_evaluations(tmp_path, 4):
        if e is not None:
            np.testing.assert_allclose(np.array(e["weights"]), ref["plaintext_weights"], atol=1e-4)


# --- configuration ------------------------------------------------------------------------------


def test_config_takes_embeddings_under_threshold_keys_within_what_they_support():
    SimulationConfig(mode="embeddings", keys="threshold", hospitals=5, dropouts=2)
    for bad, match in [
        ({"dropouts": 3}, "tolerates at most 2 dropouts"),
        ({"dp_epsilon": 1.0}, "differential privacy in mode 'embeddings' needs --keys shared"),
        ({"workers": 2}, "need --keys shared"),
        ({"sigmoid_degree": 5}, "degree-3 sigmoid"),
        ({"dropouts": 1, "epochs": 1}, "epochs 2 or more"),
    ]:
        with pytest.raises(ConfigError, match=match):
            SimulationConfig(mode="embeddings", keys="threshold", hospitals=5, **bad)
    with pytest.raises(ConfigError, match="at least 2 hospitals"):
        SimulationConfig(mode="embeddings", keys="threshold", hospitals=1)


def test_config_accepts_updates_keys_and_refuses_the_rest():
    for keys in ("none", "shared", "threshold"):
        SimulationConfig(mode="updates", keys=keys)
    with pytest.raises(ConfigError, match="supports keys shared"):
        SimulationConfig(mode="embeddings", keys="none")
    with pytest.raises(ConfigError, match="tolerates at most 2 dropouts"):
        SimulationConfig(mode="updates", keys="threshold", hospitals=5, dropouts=3)
    with pytest.raises(ConfigError, match="need --keys threshold"):
        SimulationConfig(mode="embeddings", dropouts=1)
    with pytest.raises(ConfigError, match="rounds 2 or more"):
        SimulationConfig(mode="updates", dropouts=1, rounds=1)
    with pytest.raises(ConfigError, match="rounds must be"):
        SimulationConfig(mode="updates", rounds=0)


IMPORT_CHAIN = """
import sys
import medfed.simulate, medfed.runner, medfed.errors, medfed.fl.launch
import medfed.experiments.updates, medfed.experiments.prepare, medfed.fl.updates
import medfed.fl.ciphers
print(sorted(m for m in ("torch", "timm", "tenseal", "torchvision") if m in sys.modules))
"""


def test_the_updates_path_imports_no_torch_timm_or_tenseal():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHAIN], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- Flower's simulation engine ------------------------------------------------------------------


@pytest.mark.slow
def test_flower_backend_with_a_dropout(tmp_path):
    hospitals = hospitals_f32(n_hospitals=3, n=303, d=6, n_classes=2, seed=2)
    cfg = SimulationConfig(
        hospitals=3,
        mode="updates",
        keys="shared",
        rounds=3,
        local_epochs=2,
        dropouts=1,
        backend="flower",
        progress=False,
    )
    m = federate_updates(cfg, hospitals, 2, dict(DESCRIBED))
    assert len(m["dropped"]) == 1 and m["backend"] == "flower"
    assert abs(m["accuracy_gap_pp"]) <= 0.5
