"""Whole federations on synthetic hospitals over the in-process Grid (no Ray)."""

import json

import numpy as np
import pytest

from medfed.config import SimulationConfig
from medfed.experiments.yardsticks import YARDSTICK_KEYS
from medfed.runner import federate

REQUIRED = {
    "mode",
    "keys",
    "hospitals",
    *YARDSTICK_KEYS,
    "wall_seconds",
    "bytes_up",
    "bytes_down",
}


@pytest.mark.parametrize("n_classes", [2, 4])
def test_encrypted_accuracy_matches_plaintext_reference(tmp_path, make_hospitals, n_classes):
    hospitals = make_hospitals(n_hospitals=3, n=240, d=12, n_classes=n_classes, seed=n_classes)
    cfg = SimulationConfig(
        hospitals=3, backend="local", epochs=8, lr=4.0, out=str(tmp_path), progress=False
    )
    m = federate(cfg, hospitals, n_classes, {"dataset": "synthetic"})
    assert REQUIRED <= set(m) and "exact_accuracy" not in m
    assert m["encryption_cost_pp"] == pytest.approx(100 * (m["reference_accuracy"] - m["accuracy"]))
    assert m["approximation_gap_pp"] == m["accuracy_gap_pp"]
    assert 0.5 < m["auc"] <= 1.0 and abs(m["auc"] - m["plaintext_auc"]) <= 0.01
    assert m["mode"] == "embeddings" and m["keys"] == "shared" and m["hospitals"] == 3
    # the encrypted head decides like the plaintext one: at most 1 pp apart
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.01
    # and it learned something (not a vacuous comparison of two majority-class heads)
    majority = max(np.bincount(np.concatenate([h.test_labels for h in hospitals]))) / 120
    assert m["accuracy"] > majority + 0.1
    assert m["test_samples_evaluated"] == 120
    assert m["bytes_up"] > 0 and m["bytes_down"] > 0
    assert m["excluded"] == []
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["accuracy"] == m["accuracy"]
    assert (tmp_path / "config.yaml").exists()
    rounds = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert sum('"refresh"' in r for r in rounds) == cfg.epochs
    # the refresh masks' union bound: the twin's values, the vectors the key holders decrypted
    heads = 1 if n_classes == 2 else n_classes
    groups = -(-m["layout"]["n_features"] // m["layout"]["group"])
    sent = {"products": heads * groups, "bias": heads}  # l2 > 0: the weights join the products
    assert m["refresh_masked_vectors"] == {k: cfg.epochs * v for k, v in sent.items()}
    ring = 2 * m["layout"]["slots"]
    assert m["refresh_masked_coefficients"] == sum(m["refresh_masked_vectors"].values()) * ring
    assert m["refresh_mask_bits"] >= 100  # fast: 120 bits left at the refresh
    # the run's union bound over every coefficient a key holder decrypted
    bits = m["refresh_security_bits"]
    assert 40 <= bits <= min(m["refresh_security_bits_by_kind"].values())
    # the per-party audit: every field that carries data arrives as binary (ciphertexts, keys)
    audit = m["received_by_party"]
    assert set(audit) == set(m["bytes_per_party"])
    for party, kinds in audit.items():
        assert sum(k["bytes"] for k in kinds.values()) == m["bytes_per_party"][party]["received"]
    server = audit["aggregator"]
    assert {server["upload"]["fields"][f] for f in ("x", "y", "masks")} == {"binary"}
    assert server["stats"]["fields"]["stats"] == server["sum"]["fields"]["sums"] == "binary"
    for name, kinds in audit.items():
        if name != "aggregator":
            assert kinds["upload"]["fields"]["stats_total"] == "binary"
            assert kinds["final"]["fields"]["weights"] == "binary"
            if "sum" in kinds:  # the hospitals that held a masked-sum round
                assert kinds["sum"]["fields"]["masked"] == "binary"
    # every party's ciphertexts are under one public key, of the run's CKKS parameters
    public = m["public_parameters"]
    assert public["ckks"] == "fast" and len(public["parms_id"]) == 64
    assert set(public["key_by_party"]) == set(audit)
    assert len(set(public["key_by_party"].values())) == 1
    # the leakage ledger: what the aggregator learned is this run's own record
    leak = m["leakage"]
    sizes = {h.name: len(h.train_labels) for h in hospitals}
    assert leak["aggregator"]["bucket_counts"] == {n: -(-k // 32) for n, k in sizes.items()}
    assert leak["aggregator"]["refresh_security_bits"] == m["refresh_security_bits"]
    assert leak["released_head"] == {
        "epsilon": None,  # no differential privacy in this run
        "delta": None,
        "mia_auc": m["mia_auc"],
        "mia_tpr_at_1fpr": m["mia_tpr_at_1fpr"],
        "mia_blackbox_auc": m["mia_blackbox_auc"],
    }
    assert 0.0 <= m["mia_blackbox_auc"] <= 1.0
    assert 0.0 <= m["mia_auc"] <= 1.0 and m["mia_members"] == 240


def test_depth_check_names_a_preset_that_fits_before_any_work():
    from medfed.config import ConfigError

    with pytest.raises(ConfigError, match="--ckks standard"):
        SimulationConfig(hospitals=3, backend="local", sigmoid_degree=5, ckks="fast")
    with pytest.raises(ConfigError, match="Did you mean 'fast'"):
        SimulationConfig(ckks="fats")
