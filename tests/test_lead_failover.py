"""The public keys when the lead hospital fails: the next hospital takes over, or the run stops
with one sentence (in-process federations, no Ray)."""

import pytest

from medfed.crypto.context import (
    KeyMaterialError,
    make_secret_context,
    public_context_bytes,
    secret_context_bytes,
)
from medfed.fl import messages as M
from medfed.fl.faults import parse_faults
from medfed.fl.public_keys import natural
from medfed.fl.workspace import read_secret_context
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import PARAMS, excluded, provision_all, rewrite_reply, run_local


def _provisioned(tmp_path, n, **kw):
    provision_all(tmp_path, synthetic_hospitals(n_hospitals=n, n=50 * n + 7, d=8), **kw)


def _asked(grid) -> list[int]:
    """The partition ids asked in ``public-context`` rounds, in order."""
    return [
        grid.contexts[m.metadata.dst_node_id].node_config[M.PARTITION_ID]
        for m in grid.sent
        if m.content[M.RECORD][M.STAGE] == "public-context"
    ]


def test_the_next_hospitals_take_over_in_turn_and_the_fingerprint_check_holds(tmp_path):
    # hospital-4 holds another key: it must still be excluded when hospital-2's keys are used
    _provisioned(tmp_path, 5, keys={4: make_secret_context(PARAMS)})
    faults = parse_faults(
        ["dropout:hospital=0,round=stats", "crash:hospital=1,round=public-context"]
    )
    strategy, grid, result = run_local(tmp_path, 5, faults=faults)
    assert _asked(grid) == [1, 2]  # name order after the lead, until one answers
    reasons = {(e["stage"], e["hospital"]): e["reason"] for e in result["excluded"]}
    # the lead never answered, so its node has no name yet
    assert [r for (stage, _), r in reasons.items() if stage == "stats"][0].startswith("no reply")
    assert "crashed" in reasons["public-context", "hospital-1"]
    assert (
        "different key set than the public key (from hospital-2)" in reasons["stats", "hospital-4"]
    )
    assert result["contributors"]["stats"] == ["hospital-1", "hospital-2", "hospital-3"]
    assert result["contributors"]["upload"] == ["hospital-2", "hospital-3"]  # 1 crashed
    assert not strategy.ctx.is_private()


def test_unusable_public_keys_from_the_lead_are_skipped(tmp_path):
    _provisioned(tmp_path, 3)
    other = public_context_bytes(make_secret_context(PARAMS))  # a real key, but not hospital-0's

    def swap(values, index):
        if index == 0:
            values[M.PUBLIC_CONTEXT] = other
        return values

    strategy, grid, result = run_local(tmp_path, 3, mods=[rewrite_reply("stats", swap)])
    (bad,) = excluded(result, "public-context")
    assert bad["hospital"] == "hospital-0" and "not the key it announced" in bad["reason"]
    assert _asked(grid) == [1]
    # the lead's statistics are under the consortium's key: it stays a member
    assert result["contributors"]["upload"] == ["hospital-0", "hospital-1", "hospital-2"]


def test_a_malformed_fallback_context_is_skipped(tmp_path):
    _provisioned(tmp_path, 3)

    def garble(values, index):
        values[M.PUBLIC_CONTEXT] = b"not a context"
        return values

    faults = parse_faults(["dropout:hospital=0,round=stats"])
    mods = [rewrite_reply("public-context", lambda v, i: garble(v, i) if i == 1 else v)]
    _, grid, result = run_local(tmp_path, 3, faults=faults, mods=mods)
    (bad,) = excluded(result, "public-context")
    assert bad["hospital"] == "hospital-1" and "malformed" in bad["reason"]
    assert _asked(grid) == [1, 2]


def test_no_hospital_left_to_send_the_public_context_stops_in_one_sentence(tmp_path):
    _provisioned(tmp_path, 3)
    faults = parse_faults(
        [
            "dropout:hospital=0,round=stats",
            "crash:hospital=1,round=public-context",
            "dropout:hospital=2,round=public-context",
        ]
    )
    with pytest.raises(M.FederationError) as info:
        run_local(tmp_path, 3, faults=faults)
    text = str(info.value)
    assert text.startswith("no hospital could send the public context, so the run stops (2 asked")
    assert ": no reply" in text and "hospital-1: hospital-1 crashed" in text
    assert "hospital-2: no reply" in text
    assert "\n" not in text


def test_no_statistics_at_all_stops_with_the_quorum_error(tmp_path):
    _provisioned(tmp_path, 2)
    faults = parse_faults(["dropout:hospital=0,round=stats", "crash:hospital=1,round=stats"])
    with pytest.raises(M.FederationError, match="only 0 hospital.*stats.*hospital-1 crashed"):
        run_local(tmp_path, 2, faults=faults)


def test_a_secret_key_from_a_fallback_hospital_still_stops_the_run(tmp_path):
    _provisioned(tmp_path, 3)
    secret = read_secret_context(tmp_path, 1)

    def leak(values, index):
        values[M.PUBLIC_CONTEXT] = secret
        return values

    faults = parse_faults(["dropout:hospital=0,round=stats"])
    with pytest.raises(KeyMaterialError, match="hospital-1.*contains a secret key"):
        run_local(tmp_path, 3, faults=faults, mods=[rewrite_reply("public-context", leak)])
    assert secret_context_bytes  # what a hospital must never send


def test_names_sort_naturally():
    names = ["hospital-10", "hospital-2", "hospital-1", "a"]
    assert sorted(names, key=natural) == ["a", "hospital-1", "hospital-2", "hospital-10"]
