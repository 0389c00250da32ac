"""Fault injection (``--inject``) and how the aggregator survives it; atomic result files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.config import ConfigError, SimulationConfig
from medfed.experiments.references import plaintext_reference
from medfed.experiments.results import atomic_write_text, write_run
from medfed.experiments.yardsticks import tuned_reference
from medfed.fl import messages as M
from medfed.fl.faults import (
    KINDS,
    Fault,
    FaultSpecError,
    check_faults,
    fault_mod,
    fault_mods,
    parse_fault,
)
from medfed.fl.local_grid import LocalGrid
from medfed.fl.messages import FederationError
from medfed.runner import federate
from medfed.train.head import HeadSchedule
from medfed.train.poly import fit_sigmoid
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import excluded, federation

# ----------------------------------------------------------------------------- specs

faults = st.builds(
    Fault,
    kind=st.sampled_from(KINDS),
    hospital=st.integers(0, 50),
    round=st.sampled_from(["stats", "upload", "final", "sum", "sum-0", "sum-17"]),
    seconds=st.sampled_from([0.5, 1.0, 2.0]),
    n_bytes=st.integers(1, 64),
).map(
    lambda f: Fault(
        f.kind,
        f.hospital,
        f.round,
        f.seconds if f.kind == "slow" else 0.0,
        f.n_bytes if f.kind == "corrupt" else 8,
    )
)


@given(faults)
def test_fault_specs_round_trip(fault):
    assert parse_fault(str(fault)) == fault


@settings(max_examples=200)
@given(st.text(max_size=60))
def test_any_text_parses_or_names_the_fix(text):
    try:
        parse_fault(text)
    except FaultSpecError as e:
        assert "--inject" in str(e) and "e.g." in str(e)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("crsh:hospital=1,round=upload", "did you mean 'crash'"),
        ("crash", "needs hospital, round"),
        ("crash:hospital=1", "needs round"),
        ("slow:hospital=1", "needs seconds"),
        ("slow:hospital=1,seconds=-2", r"seconds='-2' must be a number"),
        ("dropout:hospital=one,round=upload", "must be a hospital index"),
        ("dropout:hospital=-1,round=upload", ">= 0"),
        ("crash:hospital=1,rund=upload", "did you mean 'round'"),
        ("crash:hospital=1,round=upload,round=final", "given twice"),
        ("corrupt:hospital=1,round=upload,bytes=0", "1..4096"),
        ("crash:hospital=1,round=Upload!", "not a stage name"),
    ],
)
def test_bad_specs_name_the_problem_and_the_fix(spec, match):
    with pytest.raises(FaultSpecError, match=match) as info:
        parse_fault(spec)
    assert "e.g. --inject" in str(info.value)


def test_specs_are_checked_against_the_run():
    check_faults([parse_fault("crash:hospital=4,round=sum-29")], 5, 30, ("sum-<epoch>",))
    with pytest.raises(FaultSpecError, match=r"no hospital 5 .*indices 0..4"):
        check_faults([parse_fault("crash:hospital=5,round=upload")], 5)
    with pytest.raises(FaultSpecError, match="sum-0 .. sum-29"):
        check_faults([parse_fault("crash:hospital=1,round=sum-30")], 5, 30, ("sum-<epoch>",))
    with pytest.raises(ConfigError, match="did you mean 'upload'"):
        SimulationConfig(inject=("dropout:hospital=1,round=uplaod",))


def test_config_canonicalises_and_reads_yaml_lists(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "hospitals: 5\ninject:\n"
        "  - 'CRASH: hospital=1, round=sum-3'\n"
        "  - slow:hospital=4,seconds=2\n"
    )
    c = SimulationConfig.from_yaml(cfg)
    assert c.inject == ("crash:hospital=1,round=sum-3", "slow:hospital=4,seconds=2")
    assert SimulationConfig(inject="slow:hospital=0,seconds=1").inject == (
        "slow:hospital=0,seconds=1",
    )
    with pytest.raises(ConfigError, match="list of fault specs"):
        SimulationConfig(inject=3)


def test_dropout_and_crash_apply_from_their_round_on():
    crash = parse_fault("crash:hospital=1,round=sum-3")
    stages = ["stats", "upload", "sum-2", "sum-3", "sum-7", "final"]
    assert [s for s in stages if crash.matches(s)] == ["sum-3", "sum-7", "final"]
    corrupt = parse_fault("corrupt:hospital=1,round=sum")
    assert [s for s in stages if corrupt.matches(s)] == ["sum-2", "sum-3", "sum-7"]
    slow = parse_fault("slow:hospital=1,seconds=1")
    assert all(slow.matches(s) for s in stages)


# ----------------------------------------------------------------------------- the mod


def _ctx(index=0):
    return Context(
        run_id=0,
        node_id=1,
        node_config={"partition-id": index},
        state=RecordDict(),
        run_config={},
    )


def _msg(stage):
    LocalGrid(None, 1)  # sets Flower's task identity, which Messages need
    content = M.make_content(**{M.STAGE: stage, M.ROUND_ID: f"{stage}/x"})
    msg = Message(content, dst_node_id=1, message_type=M.MSG_SUM)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _echo(msg, context):
    return M.make_reply(msg, **{M.HOSPITAL: "h", M.SUMS: [b"\x00" * 64, b"\x01" * 64]})


def test_mod_dropout_stays_down_and_reads_as_no_reply():
    mod = fault_mod([parse_fault("dropout:hospital=0,round=sum-1")])
    ctx, calls = _ctx(), []

    def call_next(msg, context):
        calls.append(msg)
        return _echo(msg, context)

    assert not mod(_msg("sum-0"), ctx, call_next).has_error()
    for stage in ("sum-1", "sum-2", "final"):
        reply = mod(_msg(stage), ctx, call_next)
        assert reply.error.code == ErrorCode.NODE_UNAVAILABLE
        assert reply.error.code in M.NO_REPLY_CODES
    assert len(calls) == 1  # a dropped-out hospital does no work
    assert not mod(_msg("sum-1"), _ctx(1), call_next).has_error()  # other hospitals unaffected


def test_mod_crash_does_the_work_then_fails_and_stays_down():
    mod = fault_mod([parse_fault("crash:hospital=0,round=upload")])
    ctx, calls = _ctx(), []

    def call_next(msg, context):
        calls.append(msg)
        return _echo(msg, context)

    reply = mod(_msg("upload"), ctx, call_next)
    assert reply.error.code == ErrorCode.CLIENT_APP_CRASHED
    assert "crashed mid-round at upload" in reply.error.reason
    assert len(calls) == 1
    assert mod(_msg("final"), ctx, call_next).error.code in M.NO_REPLY_CODES
    assert len(calls) == 1


def test_mod_corrupt_flips_ciphertext_bytes_only_and_breaks_the_digest():
    mod = fault_mod([parse_fault("corrupt:hospital=0,round=sum-2,bytes=3")])
    clean = _echo(_msg("sum-2"), _ctx())
    reply = mod(_msg("sum-2"), _ctx(), _echo)
    a, b = clean.content[M.RECORD], reply.content[M.RECORD]
    assert a[M.HOSPITAL] == b[M.HOSPITAL] and a[M.DIGEST] == b[M.DIGEST]
    pairs = zip(a[M.SUMS], b[M.SUMS], strict=True)
    flipped = [sum(x != y for x, y in zip(u, v, strict=True)) for u, v in pairs]
    assert all(1 <= f <= 3 for f in flipped)
    with pytest.raises(M.ProtocolError, match="integrity check"):
        M.check_reply(b, round_id="sum-2/x", hospital="h", party="h")
    M.check_reply(a, round_id="sum-2/x", hospital="h", party="h")
    assert mod(_msg("sum-3"), _ctx(), _echo).content[M.RECORD][M.SUMS] == a[M.SUMS]


def test_mod_slow_sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr("medfed.fl.faults.time.sleep", slept.append)
    mod = fault_mod([parse_fault("slow:hospital=0,seconds=1.5,round=final")])
    mod(_msg("final"), _ctx(), _echo)
    mod(_msg("upload"), _ctx(), _echo)
    assert slept == [1.5]


def test_mod_state_lives_in_the_context():
    mod = fault_mod([parse_fault("dropout:hospital=0,round=stats")])
    ctx = _ctx()
    mod(_msg("stats"), ctx, _echo)
    assert isinstance(ctx.state.config_records["medfed.faults"], ConfigRecord)


def test_fault_mods_are_the_outermost_mod_of_the_apps_own_mods_list():
    assert fault_mods(()) == [] and fault_mods((), [_echo]) == [_echo]
    seen = []

    def inner_mod(msg, context, call_next):
        seen.append("inner")
        return call_next(msg, context)

    from medfed.fl.hospital import make_hospital_app

    faults = [parse_fault("dropout:hospital=0,round=sum-1")]
    mods = fault_mods(faults, [inner_mod])
    assert len(mods) == 2 and mods[1] is inner_mod
    app = make_hospital_app("/nonexistent", mods=mods)  # Flower's own mods= argument
    reply = app(_msg("sum-1"), _ctx())
    assert reply.error.code == ErrorCode.NODE_UNAVAILABLE and seen == []  # outermost


def test_faults_use_no_private_client_app_attributes():
    import medfed

    root = Path(medfed.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in ("_registered_funcs", "app._call", "app._mods"):
            assert name not in text, f"{path.relative_to(root)} patches ClientApp.{name}"


# ----------------------------------------------------------------------------- federations


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


# ----------------------------------------------------------------------------- atomic writes


def test_a_write_killed_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"accuracy": 0.5}\n')

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"accuracy": 0.9, "excluded": []}\n')
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left


def test_a_write_failing_halfway_leaves_no_partial_file(tmp_path, monkeypatch):
    import io

    real_fdopen = os.fdopen

    class HalfWriter(io.TextIOWrapper):
        def write(self, text):
            super().write(text[: len(text) // 2])
            self.flush()
            raise OSError("disk full")

    def fdopen(fd, mode="r", *args, **kwargs):
        return HalfWriter(real_fdopen(fd, mode.replace("w", "wb")), encoding="utf-8")

    path = tmp_path / "out" / "rounds.jsonl"
    atomic_write_text(path, "old\n")
    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new line\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in path.parent.iterdir()] == ["rounds.jsonl"]


def test_a_run_killed_mid_write_leaves_no_file_a_rerun_would_trust(tmp_path, monkeypatch):
    """write_run writes metrics.json last; a kill before it leaves no metrics.json at all."""
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(os.path.basename(dst))
        if os.path.basename(dst) == "metrics.json":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_run(tmp_path, {"hospitals": 3}, {"accuracy": float("nan")}, [{"stage": "stats"}])
    assert calls == ["config.yaml", "rounds.jsonl", "metrics.json"]
    assert not (tmp_path / "metrics.json").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_sweep_records_are_written_atomically_and_partial_ones_are_not_trusted(tmp_path):
    from medfed.experiments.sweep import load_record, record_path, store_record

    record = {
        "version": 1,
        "cell_id": "abc123def456",
        "status": "done",
        "config": {"hospitals": 3},
        "metrics": {"accuracy": 0.9},
    }
    store_record(tmp_path, dict(record))
    assert load_record(tmp_path, "abc123def456")["metrics"] == {"accuracy": 0.9}
    path = record_path(tmp_path, "abc123def456")
    full = path.read_text()
    for cut in (1, len(full) // 3, len(full) - 2):  # what a non-atomic writer could leave
        path.write_text(full[:cut])
        assert load_record(tmp_path, "abc123def456") is None
    assert np.isfinite(json.loads(full)["metrics"]["accuracy"])


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
