"""The benchmark script runs end to end and reports the fields the docs describe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "encrypted_training.py"


def _run(tmp_path, *args: str) -> tuple[dict, str]:
    """The benchmark on 600 samples with one per-sample baseline sample: its JSON and stderr."""
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", "600", "--baseline-samples", "1", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_benchmark_runs_small_and_prints_one_json_line(tmp_path):
    result, _ = _run(tmp_path, "--workers", "0", "--epochs", "1", "--accuracy-epochs", "3")
    assert result["n"] == 600 and result["workers"] == "in-process"
    assert result["worker_speedup_2v1"] is None  # no Ray configurations asked for
    assert result["parallel_capacity_2v1"] is None
    assert len(result["warmup_seconds_by_workers"]["in-process"]) == 2  # the default
    assert result["refreshes_per_epoch"] == 1 and result["refresh_bytes"] > 0
    assert 0 < result["floor_seconds"] and 0 < result["seconds_per_epoch"]
    assert result["speedup_vs_per_sample"] > 1  # the diagonal layout beats one ct per sample
    assert abs(result["accuracy_gap_pp"]) <= 1.0  # 1000 test samples: one sample is 0.1 pp
    assert result["op_counts_per_epoch"]["rotate@0"] > 0


def test_benchmark_times_ray_workers_beside_the_machines_parallel_capacity(tmp_path):
    args = ["--workers", "1,2", "--epochs", "2", "--warmup", "1", "--accuracy-epochs", "1"]
    result, stderr = _run(tmp_path, *args)
    assert set(result["epoch_seconds_by_workers"]) == {"in-process", "1", "2"}
    assert all(len(v) == 2 for v in result["epoch_seconds_by_workers"].values())
    assert all(len(v) == 1 for v in result["warmup_seconds_by_workers"].values())
    speedup = result["worker_speedup_2v1"]
    sec = result["seconds_per_epoch_by_workers"]
    assert speedup == pytest.approx(sec["1"] / sec["2"])
    capacity = result["parallel_capacity_2v1"]  # after each configuration; 2.0: two full cores
    assert set(capacity) == {"1", "2"} and all(0.5 < c < 2.5 for c in capacity.values())
    assert "parallel capacity" in stderr
