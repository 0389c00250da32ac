"""The benchmark script runs end to end and reports the fields the docs describe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "encrypted_training.py"


def test_benchmark_runs_small_and_prints_one_json_line(tmp_path):
    args = ["--n", "600", "--workers", "0", "--epochs", "1", "--accuracy-epochs", "3"]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--baseline-samples", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 600 and result["workers"] == "in-process"
    assert result["worker_speedup_2v1"] is None  # no Ray configurations asked for
    assert result["refreshes_per_epoch"] == 1 and result["refresh_bytes"] > 0
    assert 0 < result["floor_seconds"] and 0 < result["seconds_per_epoch"]
    assert result["speedup_vs_per_sample"] > 1  # the diagonal layout beats one ct per sample
    assert abs(result["accuracy_gap_pp"]) <= 1.0  # 1000 test samples: one sample is 0.1 pp
    assert result["op_counts_per_epoch"]["rotate@0"] > 0
