"""Fault injection (``--inject``, ``--dropouts``): the specs, their stages and the fault mod.

Federations under faults are in ``test_fault_runs.py``."""

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.config import ConfigError, SimulationConfig
from medfed.fl import messages as M
from medfed.fl.faults import (
    KINDS,
    Fault,
    FaultSpecError,
    check_faults,
    dropout_faults,
    fault_mod,
    fault_mods,
    parse_fault,
    stage_reached,
)
from medfed.fl.local_grid import LocalGrid

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


def test_a_rounds_partial_decryption_comes_before_its_training():
    assert stage_reached("train-2", "partial-2") and not stage_reached("partial-2", "train-2")
    assert stage_reached("partial-3", "train-2") and not stage_reached("train-1", "partial-2")
    dropout = parse_fault("dropout:hospital=0,round=partial-2")
    stages = ["stats", "partial-1", "train-1", "train-2", "train-3", "final"]  # no partials
    assert [s for s in stages if dropout.matches(s)] == ["train-2", "train-3", "final"]
    later = parse_fault("dropout:hospital=0,round=train-2")
    assert not later.matches("partial-2") and later.matches("partial-3")


def test_dropouts_are_dropout_faults_from_their_rounds_first_message():
    faults = dropout_faults({3: 2, 0: 1})
    assert faults == (Fault("dropout", 0, "partial-1"), Fault("dropout", 3, "partial-2"))
    assert [str(f) for f in faults] == [
        "dropout:hospital=0,round=partial-1",
        "dropout:hospital=3,round=partial-2",
    ]
    assert dropout_faults({}) == ()
    mod, calls = fault_mod(faults), []

    def call_next(msg, context):
        calls.append(msg)
        return _echo(msg, context)

    ctx = _ctx(3)
    for stage in ("key-setup", "stats", "partial-1", "train-1"):
        assert not mod(_msg(stage), ctx, call_next).has_error()
    for stage in ("train-2", "train-3", "final"):  # keys without partial rounds
        assert mod(_msg(stage), ctx, call_next).error.code == M.NODE_UNAVAILABLE
    assert len(calls) == 4


# ----------------------------------------------------------------------------- the mod


def _ctx(index=0):
    return Context(
        run_id=0,
        node_id=1,
        node_config={"partition-id": index},
        state=RecordDict(),
        run_config={},
    )


def _msg(stage, signed_by=None):
    LocalGrid(None, 1)  # sets Flower's task identity, which Messages need
    values = {M.STAGE: stage, M.ROUND_ID: f"{stage}/x"}
    if signed_by is not None:  # the aggregator's key: signed for node 1, as _ctx() is
        values[M.SIGNATURE] = M.sign_request(signed_by, values, M.MSG_SUM, 1)
    content = M.make_content(**values)
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


def test_fault_mods_are_the_outermost_mod_of_the_apps_own_mods_list(tmp_path):
    from tests.conftest import synthetic_hospitals
    from tests.fl_helpers import provision_all

    assert fault_mods(()) == [] and fault_mods((), [_echo]) == [_echo]
    seen = []

    def inner_mod(msg, context, call_next):
        seen.append("inner")
        return call_next(msg, context)

    from medfed.fl.hospital import make_hospital_app

    faults = [parse_fault("dropout:hospital=0,round=sum-1")]
    mods = fault_mods(faults, [inner_mod])
    assert len(mods) == 2 and mods[1] is inner_mod
    aggregator = provision_all(tmp_path, synthetic_hospitals(n_hospitals=1, n=40, d=8))
    app = make_hospital_app(tmp_path, mods=mods)  # Flower's own mods= argument
    # inside the hospital's authentication, which refuses an unsigned request first
    reply = app(_msg("sum-1"), _ctx())
    assert reply.error.code == M.APP_RAISED and "signature check" in reply.error.reason
    reply = app(_msg("sum-1", signed_by=aggregator), _ctx())
    assert reply.error.code == ErrorCode.NODE_UNAVAILABLE and seen == []  # outermost


def test_faults_use_no_private_client_app_attributes():
    import medfed

    root = Path(medfed.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in ("_registered_funcs", "app._call", "app._mods"):
            assert name not in text, f"{path.relative_to(root)} patches ClientApp.{name}"
