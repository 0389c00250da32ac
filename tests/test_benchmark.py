"""The benchmark script: its synthetic case and time-to-reference rule, and small end-to-end
runs that report the fields the docs describe."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medfed.config import SimulationConfig
from medfed.train.normalization import MIN_ACTIVE, public_width

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "encrypted_training.py"


def _module():
    spec = importlib.util.spec_from_file_location("encrypted_training_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_illcond_case_has_the_deit_spectrum_and_labels_that_are_not_separable():
    bench = _module()
    (x, y, _), (xt, yt, oracle), beta = bench.illcond(4000, 192, 2, 0)
    spectrum = bench.spectrum_summary(x)
    assert spectrum["top_share"] == pytest.approx(107 / 192, abs=0.03)
    assert spectrum["10th"] == pytest.approx(0.49, rel=0.25)
    assert spectrum["50th"] == pytest.approx(0.0026, rel=0.25)
    assert 58 <= spectrum["above_1e-3"] <= 70
    assert beta.shape == (192, 1) and set(np.unique(y)) == {0, 1}
    assert 0.75 < np.mean(oracle == yt) < 0.95  # learnable, not separable
    (_, y7, _), _, beta7 = bench.illcond(500, 48, 7, 1)
    assert beta7.shape == (48, 7) and set(np.unique(y7)) <= set(range(7))


def test_time_to_reference_counts_epochs_until_within_the_tolerance():
    bench = _module()
    seconds, accs = [1.0, 2.0, 4.0], [0.80, 0.845, 0.86]
    assert bench.time_to_reference(seconds, accs, 0.85) == (3.0, 2)  # 0.5 pp short counts
    assert bench.time_to_reference(seconds, accs, 0.80) == (1.0, 1)
    assert bench.time_to_reference(seconds, accs, 0.90) == (None, None)


def _run(tmp_path, *args: str) -> tuple[dict, str]:
    """The benchmark on 600 samples, few epochs and baseline samples: its JSON and stderr."""
    small = ["--n", "600", "--baseline-samples", "3", "--baseline-warmup", "1"]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *small, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.slow
def test_benchmark_runs_small_and_prints_one_json_line(tmp_path):
    result, _ = _run(tmp_path, "--workers", "0", "--timed-epochs", "1", "--epochs", "3")
    assert result["case"] == "illcond" and result["n"] == 600
    cfg = SimulationConfig()  # the benchmark trains with the run defaults
    assert result["components"] == cfg.components
    # 600 samples are 19 buckets: the width the aggregator would plan for them
    padded = math.ceil(600 / cfg.bucket) * cfg.bucket
    width = public_width(192, cfg.components, padded, cfg.samples_per_component)
    assert result["width"] == width == MIN_ACTIVE
    assert result["schedule"] == {
        "epochs": 3,
        "lr": cfg.lr,
        "l2": cfg.l2,
        "sigmoid_degree": cfg.sigmoid_degree,
        "sigmoid_radius": cfg.sigmoid_radius,
    }
    assert result["workers"] == "in-process"  # no Ray configurations asked for
    assert result["worker_speedup_2v1"] is None and result["parallel_capacity_2v1"] is None
    assert len(result["warmup_seconds_by_workers"]["in-process"]) == 2  # the default
    # accuracy and time to the reference
    accs = result["accuracy_per_epoch"]
    assert len(accs) == 3 == len(result["train_epoch_seconds"])
    assert result["encrypted_accuracy"] == accs[-1]
    ref = result["reference_accuracy"]
    assert result["majority_accuracy"] < ref < result["oracle_accuracy"] + 0.05
    assert 0 < result["whitened_reference_accuracy"] <= 1
    assert result["encryption_cost_pp"] == pytest.approx(100 * (ref - accs[-1]))
    k = result["epochs_to_reference"]
    if k is None:
        assert result["seconds_to_reference"] is None
        assert all(100 * (ref - a) > result["tolerance_pp"] for a in accs)
    else:
        assert 100 * (ref - accs[k - 1]) <= result["tolerance_pp"] + 1e-9
        spent = sum(result["train_epoch_seconds"][:k])
        assert result["seconds_to_reference"] == pytest.approx(spent, abs=1e-3)
    assert abs(result["accuracy_gap_pp"]) <= 1.0  # 1000 test samples: one sample is 0.1 pp
    assert len(result["plaintext_accuracy_per_epoch"]) == 3
    # the per-sample baseline: log2(padded width) rotations, median and spread, the gradient
    assert result["baseline_samples_timed"] == 3
    period = 1 << math.ceil(math.log2(width))  # a power of two
    assert result["baseline_rotations_per_sample"] == int(math.log2(period))
    spread = result["baseline_ms_per_sample_spread"]
    assert spread["min"] <= spread["p10"] <= result["baseline_ms_per_sample"] <= spread["max"]
    assert result["baseline_relative_error"] < 0.01  # the right gradient, up to CKKS noise
    assert result["baseline_seconds_per_epoch"] == pytest.approx(
        result["baseline_ms_per_sample"] / 1000 * 600
    )
    assert result["speedup_vs_per_sample"] == pytest.approx(
        result["baseline_seconds_per_epoch"] / result["seconds_per_epoch"]
    )
    assert result["speedup_vs_per_sample"] > 1  # the diagonal layout beats one ct per sample
    assert result["refreshes_per_epoch"] == 1 and result["refresh_bytes"] > 0
    # the refresh masks' union bound over the 3-epoch accuracy run, from the plaintext twin
    by_kind = result["refresh_security_bits_by_kind"]
    assert set(by_kind) == {"products", "bias"}
    assert 40 <= result["refresh_security_bits"] <= min(by_kind.values())
    assert result["refresh_mask_bits"] >= 100  # fast: 120 bits left at the refresh
    assert result["refresh_masked_vectors"]["bias"] == 3  # one head, one per epoch
    assert 0 < result["floor_seconds"] and 0 < result["seconds_per_epoch"]
    assert result["op_counts_per_epoch"]["rotate@0"] > 0
    assert 0.5 < result["feature_spectrum"]["top_share"] < 0.6
    assert 0 < result["label_signal_in_components"] < 1


@pytest.mark.slow
def test_benchmark_times_ray_workers_beside_the_machines_parallel_capacity(tmp_path):
    args = ["--case", "isotropic", "--workers", "1,2", "--timed-epochs", "2", "--warmup", "1"]
    result, stderr = _run(tmp_path, *args, "--epochs", "1")
    assert result["case"] == "isotropic" and result["label_signal_in_components"] is None
    assert set(result["epoch_seconds_by_workers"]) == {"in-process", "1", "2"}
    assert all(len(v) == 2 for v in result["epoch_seconds_by_workers"].values())
    assert all(len(v) == 1 for v in result["warmup_seconds_by_workers"].values())
    speedup = result["worker_speedup_2v1"]
    sec = result["seconds_per_epoch_by_workers"]
    assert speedup == pytest.approx(sec["1"] / sec["2"])
    assert result["seconds_per_epoch"] == sec["in-process"]  # the headline is in process
    by_workers = result["speedup_vs_per_sample_by_workers"]
    assert by_workers["2"] == pytest.approx(result["baseline_seconds_per_epoch"] / sec["2"])
    capacity = result["parallel_capacity_2v1"]  # after each configuration; 2.0: two full cores
    assert set(capacity) == {"1", "2"} and all(0.5 < c < 2.5 for c in capacity.values())
    assert "parallel capacity" in stderr
