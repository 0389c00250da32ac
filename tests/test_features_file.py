"""Hospitals from a features file (``--features``, both modes): the loader's checks, the
same partition as the embeddings pipeline, and CLI runs from such a file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medfed.config import SimulationConfig
from medfed.experiments.prepare import hospitals_from_features, load_features, split_hospitals


def _features_file(path, n=260, m=90, d=10, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, n_classes))
    arrays = {}
    for split, k in (("train", n), ("test", m)):
        x = rng.normal(loc=1.0, scale=2.0, size=(k, d))
        arrays[f"{split}_features"] = x.astype(np.float32)
        arrays[f"{split}_labels"] = np.argmax((x - 1.0) @ w, axis=1).astype(np.int64)
    np.savez(path, **arrays, n_classes=n_classes, dataset="toy")
    return path


def test_cli_runs_updates_from_a_features_file(tmp_path):
    from medfed.simulate import main

    feats = _features_file(tmp_path / "f.npz")
    for keys in ("none", "shared"):
        out = tmp_path / keys
        code = main(
            [
                *["--mode", "updates", "--keys", keys, "--features", str(feats)],
                *["--hospitals", "3", "--rounds", "3", "--local-epochs", "2"],
                *["--backend", "local", "--no-progress", "--out", str(out)],
            ]
        )
        assert code == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["dataset"] == "toy" and m["n_classes"] == 3 and m["mode"] == "updates"
        assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.005
        assert m["accuracy"] > 0.5  # 3 classes: well above chance


def test_cli_runs_embeddings_from_a_features_file(tmp_path):
    from medfed.simulate import main

    feats = _features_file(tmp_path / "f.npz", n_classes=2)
    out = tmp_path / "emb"
    code = main(
        [
            *["--mode", "embeddings", "--features", str(feats), "--hospitals", "2"],
            *["--epochs", "3", "--components", "0", "--backend", "local", "--no-progress"],
            *["--out", str(out)],
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "toy" and m["mode"] == "embeddings" and m["embed_dim"] == 10
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.02


def test_a_bad_features_file_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_features=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="lacks train_labels"):
        load_features(bad)
    with pytest.raises(ValueError, match="export_features"):
        load_features(tmp_path / "missing.npz")


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "medfed.simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_threshold_keys_without_openfhe_exit_2_naming_the_fix(tmp_path):
    from medfed.crypto.threshold import openfhe_available

    if openfhe_available():
        pytest.skip("OpenFHE imports here; see tests/threshold/")
    feats = _features_file(tmp_path / "f.npz")
    for mode in ("updates", "embeddings"):
        r = _run_cli("--mode", mode, "--keys", "threshold", "--features", str(feats))
        assert r.returncode == 2
        assert "OpenFHE" in r.stderr and "3.10" in r.stderr and ".[threshold]" in r.stderr
        assert "Traceback" not in r.stderr + r.stdout


def test_a_features_file_is_partitioned_as_the_pipeline_partitions_embeddings(tmp_path):
    feats = _features_file(tmp_path / "f.npz", n_classes=2)
    cfg = SimulationConfig(
        mode="updates", keys="none", hospitals=3, split="dirichlet", features=str(feats)
    )
    hospitals, n_classes, described = hospitals_from_features(cfg)
    f = load_features(feats)
    same = split_hospitals(
        cfg, f["train_features"], f["train_labels"], f["test_features"], f["test_labels"]
    )
    assert n_classes == 2 and described["dataset"] == "toy"
    assert [h.name for h in hospitals] == ["hospital-0", "hospital-1", "hospital-2"]
    for h, g in zip(hospitals, same, strict=True):
        np.testing.assert_array_equal(h.train_features, g.train_features)
        np.testing.assert_array_equal(h.test_labels, g.test_labels)
    assert sum(len(h.train_labels) for h in hospitals) == len(f["train_labels"])
