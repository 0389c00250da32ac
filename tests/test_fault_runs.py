"""Federations under injected faults: exclusions per stage, the references over the same
hospitals, the quorum, the ledger, and Flower's simulation engine."""

import json

import numpy as np
import pytest

from medfed.config import SimulationConfig
from medfed.experiments.references import plaintext_reference
from medfed.experiments.yardsticks import tuned_reference
from medfed.fl import messages as M
from medfed.fl.faults import parse_fault
from medfed.fl.messages import FederationError
from medfed.runner import federate
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import excluded, federation


def _federate(tmp_path, inject, n=4, epochs=3, **kw):
    hospitals = synthetic_hospitals(n_hospitals=n, n=60 * n + 5, d=8, seed=3)
    cfg = SimulationConfig(
        hospitals=n,
        backend="local",
        epochs=epochs,
        lr=4.0,
        progress=False,
        inject=tuple(inject),
        out=str(tmp_path / "run"),
        **kw,
    )
    return hospitals, federate(cfg, hospitals, 2, {"dataset": "synthetic"})


def test_excluded_hospitals_are_left_out_of_the_references_too(tmp_path):
    hospitals, m = _federate(
        tmp_path,
        [
            "dropout:hospital=3,round=upload",
            "corrupt:hospital=1,round=upload",
            "slow:hospital=2,seconds=0.05,round=final",
        ],
    )
    reasons = {(e["stage"], e["hospital"]): e["reason"] for e in m["excluded"]}
    assert "integrity check" in reasons["upload", "hospital-1"]
    assert reasons["upload", "hospital-3"].startswith("no reply")
    assert m["contributors"]["upload"] == ["hospital-0", "hospital-2"]
    assert m["contributors"]["final"] == ["hospital-0", "hospital-1", "hospital-2"]
    # the plaintext reference used exactly the data the federation used
    cfg = SimulationConfig()
    ref = plaintext_reference(
        hospitals,
        2,
        HeadSchedule(3, 4.0, fit_sigmoid(3, cfg.sigmoid_radius), cfg.l2),
        4096,
        32,
        1.0,
        components=cfg.components,
        normalized_over=[0, 1, 2, 3],
        trained_on=[0, 2],
        evaluated_on=[0, 1, 2],
    )
    assert m["plaintext_accuracy"] == ref["plaintext_accuracy"]
    assert m["test_samples_evaluated"] == sum(len(hospitals[i].test_labels) for i in (0, 1, 2))
    # so did the tuned reference: the upload contributors' train data, the evaluators' test data
    tuned = tuned_reference(
        np.vstack([hospitals[i].train_features for i in (0, 2)]),
        np.concatenate([hospitals[i].train_labels for i in (0, 2)]),
        np.vstack([hospitals[i].test_features for i in (0, 1, 2)]),
        np.concatenate([hospitals[i].test_labels for i in (0, 1, 2)]),
        2,
        0,
    )
    assert {k: m[k] for k in tuned} == tuned
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.02
    # and metrics.json lists the exclusions
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["excluded"] == m["excluded"]
    assert (tmp_path / "run" / "config.yaml").read_text().count("dropout:hospital=3") == 1


def test_lead_hospital_crash_falls_back_to_another_public_context(tmp_path):
    _, m = _federate(tmp_path, ["crash:hospital=0,round=stats"])
    assert [(e["stage"], e["reason"]) for e in m["excluded"][:1]] == [
        ("stats", "hospital-0 crashed mid-round at stats (injected fault)")
    ]
    assert "hospital-0" not in m["contributors"]["stats"]
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.02


def test_failing_key_holders_are_retried_with_the_next_hospital(tmp_path):
    _, m = _federate(
        tmp_path,
        [
            "corrupt:hospital=0,round=sum",
            "crash:hospital=1,round=sum",
            "dropout:hospital=2,round=sum",
        ],
        n=4,
        epochs=4,
    )
    sums = [e for e in m["excluded"] if e["stage"].startswith("sum-")]
    assert {e["hospital"] for e in sums} == {"hospital-0", "hospital-1", "hospital-2"}
    rounds = [
        json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    ]
    refreshes = [r for r in rounds if r["stage"] == "refresh"]
    assert len(refreshes) == 4 and {r["hospital"] for r in refreshes} == {"hospital-3"}
    # every hospital trained: the head is the full-data head
    assert m["contributors"]["upload"] == [f"hospital-{i}" for i in range(4)]
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.02


def test_too_few_hospitals_left_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FederationError, match="only 1 hospital.*upload.*fewer than the 2") as info:
        _federate(
            tmp_path,
            ["dropout:hospital=0,round=upload", "dropout:hospital=1,round=upload"],
            n=3,
        )
    assert "hospital-0: no reply" in str(info.value)
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing half-done is written


def test_no_key_holder_left_stops_the_run(tmp_path):
    with pytest.raises(FederationError, match="masked-sum round"):
        _federate(tmp_path, [f"crash:hospital={i},round=sum-1" for i in range(3)], n=3)


def test_replies_are_recorded_under_their_round_in_the_ledger(tmp_path):
    _, strategy, grid, result = federation(
        tmp_path, n=3, faults=[parse_fault("slow:hospital=1,seconds=0.2,round=upload")]
    )
    upload = next(r for r in result["rounds"] if r["stage"] == "upload")
    assert upload["seconds"] >= 0.2
    assert excluded(result) == []
    stages = [m.content[M.RECORD][M.STAGE] for m in grid.sent]
    assert stages[:3] == ["stats"] * 3 and stages[-3:] == ["final"] * 3


@pytest.mark.slow
def test_faults_under_flowers_simulation_engine(tmp_path):
    """Ray actors, not one process: a crashed hospital stays down through Context.state."""
    hospitals = synthetic_hospitals(n_hospitals=4, n=245, d=8, seed=3)
    cfg = SimulationConfig(
        hospitals=4,
        backend="flower",
        epochs=3,
        lr=4.0,
        progress=False,
        inject=("crash:hospital=1,round=upload", "corrupt:hospital=3,round=upload"),
    )
    m = federate(cfg, hospitals, 2, {"dataset": "synthetic"})
    reasons = {(e["stage"], e["hospital"]): e["reason"] for e in m["excluded"]}
    assert "crashed mid-round at upload" in reasons["upload", "hospital-1"]
    assert "integrity check" in reasons["upload", "hospital-3"]
    assert reasons["final", "hospital-1"].startswith("no reply")
    assert m["contributors"]["upload"] == ["hospital-0", "hospital-2"]
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.02
