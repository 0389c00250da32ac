"""Security checks as tests: key material, plaintext leaks to logs/results, replay, identity."""

import json
import logging
import re

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sa

from medfed.config import SimulationConfig
from medfed.crypto.context import KeyMaterialError, secret_context_bytes
from medfed.crypto.seal import SealEngine
from medfed.crypto.signing import SIGNATURE_BYTES
from medfed.fl import aggregator as agg
from medfed.fl import messages as M
from medfed.fl import public_keys
from medfed.fl.local_grid import LocalGrid
from medfed.fl.workspace import ERRORS, hospital_dir
from medfed.runner import federate
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import excluded, federation, provision_all, rewrite_reply, run_local

SENTINEL = 1234.5678  # a recognisable hospital feature value
SENTINEL_TEXTS = ("1234.5678", "1234.567", "1.2345678e+03", "1234.56")


def _with_sentinel(n=3, d=8):
    hospitals = synthetic_hospitals(n_hospitals=n, n=50 * n + 7, d=d, seed=5)
    for h in hospitals:
        h.train_features[0, 0] = SENTINEL
        h.test_features[1, 2] = SENTINEL
    return hospitals


# a bytes repr of key or ciphertext material: long, and with \x escapes (random bytes always
# have some); a run of blanks that some library printed as b'   ' is not hospital data
BYTES_REPR = re.compile(r"(?<![\w'\"])b(['\"])(?=[^'\"]*\\x)[^'\"]{64,}|bytearray\(")
NON_PRINTABLE_RUN = re.compile(r"[^\x20-\x7e\n\t]{8,}")


def _leaky(text: str) -> list[str]:
    problems = [s for s in SENTINEL_TEXTS if s in text]
    problems += [m.group(0)[:40] for m in BYTES_REPR.finditer(text)]
    problems += [repr(m.group(0)[:20]) for m in NON_PRINTABLE_RUN.finditer(text)]
    return problems


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("medfed", "flwr"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    return caplog


def test_no_hospital_data_key_or_ciphertext_bytes_reach_logs_or_result_files(
    tmp_path, debug_logs, capsys
):
    hospitals = _with_sentinel()
    out = tmp_path / "run"
    cfg = SimulationConfig(
        hospitals=3,
        backend="local",
        epochs=2,
        progress=False,
        out=str(out),
        inject=("corrupt:hospital=1,round=upload", "crash:hospital=2,round=final"),
    )
    m = federate(cfg, hospitals, 2, {"dataset": "synthetic"})
    assert len(m["excluded"]) == 2  # failure paths are logged too
    records = debug_logs.records
    assert any(r.levelno == logging.DEBUG and "replied" in r.getMessage() for r in records)
    # the checks below do catch what they look for
    assert _leaky(repr(b"\x00" * 80)) and _leaky("x = 1234.5678") and _leaky("\x01" * 9)
    texts = [r.getMessage() for r in records]
    texts += [repr(r.args) for r in records if r.args]
    captured = capsys.readouterr()
    texts += [captured.out, captured.err]
    texts += [(out / f).read_text() for f in ("metrics.json", "rounds.jsonl", "config.yaml")]
    leaks = [p for t in texts for p in _leaky(t)]
    assert leaks == []
    # sanity: the sentinel really was in the data the federation trained on
    assert SENTINEL in hospitals[0].train_features


def test_a_hospitals_error_text_stays_in_its_own_errors_log(tmp_path, debug_logs, monkeypatch):
    hospitals = _with_sentinel()
    provision_all(tmp_path, hospitals)

    def leaky_pack(x, labels, layout, position):
        raise ValueError(f"cannot pack value {SENTINEL} of row 0")  # quotes private data

    monkeypatch.setattr("medfed.fl.hospital.pack_diagonal", leaky_pack)
    with pytest.raises(agg.FederationError):  # nobody could upload
        run_local(tmp_path, 3)
    text = " ".join(r.getMessage() for r in debug_logs.records)
    assert "upload failed; details are in the hospital's own errors.log" in text
    assert "ValueError" not in text  # the reply names no error class
    assert _leaky(text) == []
    private = (hospital_dir(tmp_path, 0) / ERRORS).read_text()
    assert "1234.5678" in private  # the details stay with the hospital


def test_the_aggregator_deserializes_only_public_material(tmp_path, monkeypatch):
    loaded: list[tuple[str, bool]] = []  # (SEAL object type, loaded by a secret-key holder)
    contexts: list[bool] = []  # is_private() of every context the aggregator loads
    real_load = SealEngine._load
    real_context = public_keys.load_public_context

    def load(self, obj, data):
        loaded.append((type(obj).__name__, self.private))
        return real_load(self, obj, data)

    def load_context(data, sender="hospital"):
        ctx = real_context(data, sender=sender)
        contexts.append(ctx.is_private())
        return ctx

    monkeypatch.setattr(SealEngine, "_load", load)
    monkeypatch.setattr(public_keys, "load_public_context", load_context)
    _, strategy, grid, result = federation(tmp_path, n=3)
    server = {kind for kind, private in loaded if not private}
    # Plaintexts and Ciphertexts it builds itself too: the refresh's mask images and masks
    assert server == {"Ciphertext", "GaloisKeys", "Plaintext"}
    assert contexts == [False]
    assert not strategy.ctx.is_private() and strategy.engine.decryptor is None
    # every bytes value the aggregator received is public context, Galois keys or a ciphertext,
    # besides each reply's Ed25519 signature (64 bytes, checked by the aggregator)
    for reply in grid.received:
        for key, value in reply.content[M.RECORD].items():
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, bytes):
                    continue
                if key == M.SIGNATURE:
                    assert len(item) == SIGNATURE_BYTES
                elif key == M.PUBLIC_CONTEXT:
                    assert not ts.context_from(item).is_private()
                elif key == M.GALOIS_KEYS:
                    strategy.engine._load_galois(item)
                else:
                    assert isinstance(
                        strategy.engine.from_bytes(item, sender="t", item=key).ct, sa.Ciphertext
                    )
    # and every message it sent carries only ciphertexts, layouts, positions and steps (and
    # its own signature)
    for msg in grid.sent:
        for key, value in msg.content[M.RECORD].items():
            for item in value if isinstance(value, list) else [value]:
                if key == M.SIGNATURE:
                    assert isinstance(item, bytes) and len(item) == SIGNATURE_BYTES
                elif isinstance(item, bytes):
                    strategy.engine.from_bytes(item, sender="aggregator", item=key)
                else:
                    assert isinstance(item, str | int), key


def test_a_secret_context_sent_as_public_is_refused(tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    provision_all(tmp_path, hospitals)
    from medfed.fl.workspace import read_secret_context

    secret = read_secret_context(tmp_path, 0)

    def leak(values, index):
        if M.PUBLIC_CONTEXT in values:
            values[M.PUBLIC_CONTEXT] = secret
        return values

    with pytest.raises(KeyMaterialError, match="hospital-0.*contains a secret key") as info:
        run_local(tmp_path, 3, mods=[rewrite_reply("stats", leak)])
    assert "public_context_bytes" in str(info.value)  # names the fix
    assert ts.context_from(secret).is_private()  # the test did send a real secret key
    assert secret_context_bytes  # imported for the reader: this is what must never be sent


class ReplayGrid(LocalGrid):
    """Answers one later masked-sum request with the node's reply to an earlier round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_sum_reply: dict[int, object] = {}
        self.replayed = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        out = []
        for msg, reply in zip(messages, replies, strict=True):
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == M.MSG_SUM and not reply.has_error():
                if node in self.first_sum_reply and not self.replayed:
                    reply = self.first_sum_reply[node]  # replayed from an earlier round
                    self.replayed += 1
                else:
                    self.first_sum_reply[node] = reply
            out.append(reply)
        return out


def test_a_reply_replayed_from_an_earlier_round_is_rejected(tmp_path):
    _, strategy, grid, result = federation(tmp_path, n=3, epochs=5, grid_cls=ReplayGrid)
    assert grid.replayed >= 1
    replays = [e for e in result["excluded"] if "replayed" in e["reason"]]
    assert replays and all(e["stage"].startswith("sum-") for e in replays)
    assert "round id" in replays[0]["reason"]
    # the round was retried with another hospital, and training completed
    assert len(result["refreshes"]) == 5


def test_a_reply_claiming_another_hospitals_identity_is_rejected(tmp_path):
    def impersonate(values, index):
        if index == 1:
            values[M.HOSPITAL] = "hospital-2"
        return values

    _, strategy, grid, result = federation(
        tmp_path, n=3, mods=[rewrite_reply("upload", impersonate)]
    )
    bad = excluded(result, "upload")
    assert [e["hospital"] for e in bad] == ["hospital-1"]
    assert "claims to come from 'hospital-2'" in bad[0]["reason"]
    assert result["contributors"]["upload"] == ["hospital-0", "hospital-2"]


def test_a_node_claiming_another_name_at_stats_fails_that_hospitals_signature(tmp_path):
    """Before signatures, both claimants of one name were rejected (nobody could tell which
    was genuine); now the impostor's reply fails the pinned key of the name it claims."""

    def clone(values, index):
        if index == 2:
            values[M.HOSPITAL] = "hospital-0"
        return values

    hospitals = synthetic_hospitals(n_hospitals=4, n=207, d=8)
    provision_all(tmp_path, hospitals)
    _, _, result = run_local(tmp_path, 4, mods=[rewrite_reply("stats", clone)])
    bad = excluded(result, "stats")
    assert len(bad) == 1 and "does not verify under its pinned public key" in bad[0]["reason"]
    assert "in the name of 'hospital-0'" in bad[0]["reason"]
    assert result["contributors"]["stats"] == ["hospital-0", "hospital-1", "hospital-3"]


def test_one_hospital_answering_from_two_nodes_is_rejected_on_both(tmp_path):
    """Both nodes sign validly as hospital-0 (one workspace served twice): neither is kept."""

    class TwinGrid(LocalGrid):
        def __init__(self, app, n):
            super().__init__(app, n)
            twin = min(self.contexts)  # partition n-1 -> serves hospital 0 too
            self.contexts[twin].node_config[M.PARTITION_ID] = 0

    hospitals = synthetic_hospitals(n_hospitals=4, n=207, d=8)
    provision_all(tmp_path, hospitals)
    _, _, result = run_local(tmp_path, 4, grid_cls=TwinGrid)
    bad = excluded(result, "stats")
    assert len(bad) == 2 and all("2 nodes claim the name 'hospital-0'" in e["reason"] for e in bad)
    assert result["contributors"]["stats"] == ["hospital-1", "hospital-2"]


def test_replies_from_nodes_that_were_not_asked_are_ignored(tmp_path, caplog):
    class ChattyGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if replies and messages and messages[0].metadata.message_type == M.MSG_SUM:
                stray = replies[0]
                other = next(n for n in self.contexts if n != stray.metadata.src_node_id)
                copy = type(stray)(stray.content, reply_to=messages[0])
                copy.metadata.__dict__["_src_node_id"] = other
                replies.append(copy)
            return replies

    _, _, grid, result = federation(tmp_path, n=3, grid_cls=ChattyGrid)
    assert "ignoring an unexpected reply" in caplog.text
    assert result["excluded"] == []


def test_only_public_keys_and_ciphertexts_are_in_every_message_type(tmp_path):
    """No message type carries a float: numbers a hospital sends are bucket counts/positions."""
    _, _, grid, _ = federation(tmp_path, n=3)
    for msg in list(grid.sent) + list(grid.received):
        if msg.has_error():
            continue
        for value in msg.content[M.RECORD].values():
            for item in value if isinstance(value, list) else [value]:
                assert not isinstance(item, float | np.floating)
    digests = [r.content[M.RECORD][M.DIGEST] for r in grid.received]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)
    assert json.dumps(digests)  # plain hex strings, safe in logs
