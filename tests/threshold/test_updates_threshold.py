"""Mode "updates" with threshold keys: FedAvg over OpenFHE multiparty CKKS, end to end.

Runs only where `openfhe` imports (the Python 3.10 environment: README.md here). Hospitals run
as a Flower ClientApp behind a LocalGrid; the key shares live in their process only.

Tolerance: a fused decryption is exact to ``context.tolerance`` per slot (about 0.02-0.04 at
the "test" preset); FedAvg divides by the total sample count (~500 here), so the head matches
plain FedAvg to ~1e-4 per round; 2e-3 allows for a few rounds of propagation. Test accuracy
must match plain FedAvg within 0.5 percentage points (the issue's bar; it is equal here).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from medfed.crypto.channel import ChannelError, Identity, open_sealed  # noqa: E402
from medfed.crypto.signing import provision_keys  # noqa: E402
from medfed.crypto.threshold import (  # noqa: E402
    ThresholdError,
    ThresholdParty,
    _unpack_partials,
)
from medfed.experiments.updates_reference import fedavg_reference  # noqa: E402
from medfed.fl import messages as M  # noqa: E402
from medfed.fl.ciphers import _THRESHOLD_PARTIES, forget_threshold_parties, unframe  # noqa: E402
from medfed.fl.faults import dropout_faults, fault_mods  # noqa: E402
from medfed.fl.local_grid import LocalGrid  # noqa: E402
from medfed.fl.updates import (  # noqa: E402
    UpdatesAggregator,
    UpdatesSettings,
    make_updates_hospital_app,
)
from medfed.fl.workspace import HospitalData, provision, read_evaluations  # noqa: E402

pytestmark = pytest.mark.openfhe

N_HOSPITALS, ROUNDS, LOCAL_EPOCHS, LR = 5, 4, 2, 2.0
ATOL = 2e-3


def make_hospitals(n_hospitals=N_HOSPITALS, n=523, d=8, n_classes=3, seed=0):
    """Separable-ish data over hospitals; float32-exact (workspaces store float32)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, n_classes))

    def sample(m):
        x = rng.normal(loc=3.0, scale=2.0, size=(m, d)).astype(np.float32).astype(np.float64)
        y = np.argmax((x - 3.0) @ w + 0.3 * rng.normal(size=(m, n_classes)), axis=1)
        return x, y.astype(np.int64)

    xtr, ytr = sample(n)
    xte, yte = sample(n // 2)
    tr = np.array_split(np.arange(n), n_hospitals)
    te = np.array_split(np.arange(n // 2), n_hospitals)
    return [
        HospitalData(f"hospital-{i}", xtr[a], ytr[a], xte[b], yte[b])
        for i, (a, b) in enumerate(zip(tr, te, strict=True))
    ]


def run_federation(ws, hospitals, n_classes=3, dropouts=None, rounds=ROUNDS, aggregator=None):
    """``dropouts``: hospital index -> FedAvg round from which it answers nothing;
    ``aggregator``: the aggregator class (default :class:`UpdatesAggregator`)."""
    meta = {"keys": "threshold", "n_classes": n_classes, "ckks": "fast", "feature_scale": 1.0}
    ring = provision_keys([h.name for h in hospitals])
    for i, h in enumerate(hospitals):
        provision(ws, i, h, None, meta, signing=ring.hospitals[i])
    settings = UpdatesSettings(
        keys="threshold",
        rounds=rounds,
        local_epochs=LOCAL_EPOCHS,
        lr=LR,
        n_classes=n_classes,
        n_features=hospitals[0].train_features.shape[1],
        expected_hospitals=len(hospitals),
        threshold_preset="test",
        signing=ring.aggregator,
    )
    mods = fault_mods(dropout_faults(dropouts or {}))
    grid = LocalGrid(make_updates_hospital_app(ws, mods=mods), len(hospitals))
    strategy = (aggregator or UpdatesAggregator)(settings)
    return strategy, grid, strategy.run(grid)


def reference_for(hospitals, result, n_classes=3, rounds=ROUNDS):
    index = {h.name: i for i, h in enumerate(hospitals)}
    return fedavg_reference(
        hospitals,
        n_classes,
        rounds,
        LOCAL_EPOCHS,
        LR,
        participants=[[index[n] for n in names] for names in result["participants"]],
        evaluators=[index[n] for n in result["evaluated_by"]],
    )


def assert_matches_plain_fedavg(ws, hospitals, result, n_hospitals=N_HOSPITALS):
    ref = reference_for(hospitals, result)
    evals = [e for e in read_evaluations(ws, n_hospitals) if e is not None]
    assert len(evals) == len(result["evaluated_by"])
    for e in evals:
        np.testing.assert_allclose(np.array(e["weights"]), ref["plaintext_weights"], atol=ATOL)
    acc = sum(e["correct"] for e in evals) / sum(e["total"] for e in evals)
    assert abs(acc - ref["plaintext_accuracy"]) <= 0.005
    assert ref["plaintext_accuracy"] > 0.6  # 3 classes: the head learned


@pytest.fixture(scope="module")
def run5(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    hospitals = make_hospitals()
    strategy, grid, result = run_federation(ws, hospitals)
    yield strategy, grid, result, hospitals, ws
    forget_threshold_parties(ws)


def _values(reply):
    for key, value in reply.content[M.RECORD].items():
        for item in value if isinstance(value, list) else [value]:
            yield key, item


def _walk(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    children = []
    if isinstance(obj, dict):
        children = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, list | tuple | set):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    for child in children:
        yield from _walk(child, seen)


# --- accuracy ----------------------------------------------------------------------------------


def test_five_hospitals_reach_plain_fedavg(run5):
    strategy, _, result, hospitals, ws = run5
    assert result["cipher"]["t"] == 3 and result["cipher"]["n"] == 5
    assert result["dropped"] == [] and result["excluded"] == []
    assert_matches_plain_fedavg(ws, hospitals, result)


def test_the_run_reports_the_partial_decryptions_each_key_share_made(run5):
    _, _, result, _, ws = run5
    parties = {c.party.index: c.party for (w, _), c in _THRESHOLD_PARTIES.items() if w == str(ws)}
    made = {str(share): p.decryptions[share] for share, p in sorted(parties.items())}
    assert result["cipher"]["decryptions_by_share"] == made  # what the hospitals counted
    assert result["cipher"]["decryptions"] == 1 + ROUNDS  # stats, ROUNDS - 1 sums, final
    assert result["cipher"]["max_decryptions"] == 1024


@pytest.mark.parametrize("dropped", [1, 4])  # partition 4 holds key share 1 (the "lead" share)
def test_one_hospital_dropping_out_mid_training_completes(tmp_path, dropped):
    hospitals = make_hospitals(seed=dropped)
    try:
        strategy, _, result = run_federation(tmp_path, hospitals, dropouts={dropped: 2})
        assert [d["hospital"] for d in result["dropped"]] == [f"hospital-{dropped}"]
        assert [len(p) for p in result["participants"]] == [5, 5, 4, 4]
        (recovery,) = result["cipher"]["recoveries"]
        assert recovery["round"] == 2
        counts: dict[int, list[int]] = {}  # key share -> the count of each party holding it
        for (w, _), c in _THRESHOLD_PARTIES.items():
            for share, made in c.party.decryptions.items() if w == str(tmp_path) else ():
                counts.setdefault(share, []).append(made)
        for share, made in result["cipher"]["decryptions_by_share"].items():
            assert made <= max(counts[int(share)])  # a recovered share's count never falls short
        assert_matches_plain_fedavg(tmp_path, hospitals, result)
    finally:
        forget_threshold_parties(tmp_path)


def test_two_dropouts_of_five_still_decrypt(tmp_path):
    hospitals = make_hospitals(seed=7)
    try:
        _, _, result = run_federation(tmp_path, hospitals, dropouts={0: 1, 3: 3})
        assert {d["hospital"] for d in result["dropped"]} == {"hospital-0", "hospital-3"}
        assert len(result["cipher"]["recoveries"]) == 2
        assert_matches_plain_fedavg(tmp_path, hospitals, result)
    finally:
        forget_threshold_parties(tmp_path)


# --- fewer than t cannot decrypt ----------------------------------------------------------------


def test_fewer_than_t_hospitals_stop_the_run(tmp_path):
    hospitals = make_hospitals(seed=3)
    try:
        with pytest.raises(M.FederationError, match="only 2 hospitals remain"):
            run_federation(tmp_path, hospitals, dropouts={0: 2, 1: 2, 2: 2})
    finally:
        forget_threshold_parties(tmp_path)


def test_fewer_than_t_hospitals_cannot_decrypt_the_aggregate(run5):
    _, grid, _, _, ws = run5
    parties = {c.party.index: c.party for (w, _), c in _THRESHOLD_PARTIES.items() if w == str(ws)}
    assert sorted(parties) == [1, 2, 3, 4, 5]
    aggregate = next(
        m.content[M.RECORD][M.AGGREGATE]
        for m in reversed(grid.sent)
        if m.metadata.message_type == M.MSG_PARTIAL
    )
    (ct,) = unframe(aggregate)
    p1, p2, p3 = parties[1], parties[2], parties[3]
    partials = [p.partial_decrypt(ct) for p in (p1, p2)]  # t - 1 = 2 hospitals
    with pytest.raises(ThresholdError, match="missing"):
        p1.fuse(ct, partials)
    # nor can they rebuild a third hospital's key share: that takes t = 3 Shamir shares
    sealed = p2.recovery_share(3, 1, round=991)
    fresh = ThresholdParty(p1.context, 1)  # a blank party cannot help either
    assert fresh.key_shares == ()
    with pytest.raises(ThresholdError, match="needs t=3"):
        p1.recover_key(3, {2: sealed}, round=991)
    # with all five shares the same aggregate decrypts
    everyone = [p.partial_decrypt(ct) for p in parties.values()]
    assert np.all(np.isfinite(p3.fuse(ct, everyone, length=10)))


# --- what the aggregator holds and sees ---------------------------------------------------------


def test_the_aggregator_holds_no_secret_and_no_channel_identity(run5):
    strategy, *_ = run5
    objects = list(_walk(strategy))
    assert not any(isinstance(o, openfhe.PrivateKey) for o in objects)
    assert not any(isinstance(o, Identity | ThresholdParty) for o in objects)
    for name in ("partial_decrypt", "fuse", "recover_key", "decrypt"):
        assert not hasattr(strategy.cipher.agg, name)


def test_the_aggregator_cannot_open_or_fuse_partial_decryptions(run5):
    strategy, grid, _, _, ws = run5
    lead = next(c.party for (w, _), c in _THRESHOLD_PARTIES.items() if w == str(ws))
    sealed = [
        (r, item)
        for r in grid.received
        for key, item in _values(r)
        if key == M.SEALED and r.metadata.message_type == M.MSG_PARTIAL
    ]
    assert len(sealed) == (1 + ROUNDS) * 5 * 4  # each partial round: 5 hospitals x 4 peers
    eavesdropper = Identity.generate()
    for _, blob in sealed:
        assert blob.startswith(b"MFSEAL1")  # sealed, never a raw partial decryption
        with pytest.raises(ThresholdError):
            _unpack_partials(blob)
        with pytest.raises(ChannelError, match="another recipient"):
            open_sealed(eavesdropper, lead.public_bundle, blob, b"any context")


ALLOWED_REPLY_KEYS = {
    M.HOSPITAL,
    M.THRESHOLD_CONTEXT,
    M.BUNDLE,
    M.PARTY,
    M.PUBLIC_KEY,
    M.SEALED,
    M.RECIPIENTS,
    M.UPDATE,
    M.OK,
    M.ROUND_ID,
    M.DIGEST,
    M.SIGNATURE,  # the hospital's Ed25519 signature of its reply (64 bytes)
    M.ENDORSEMENT,  # its signature of its bundle / key-chain link, for its peers (64 bytes)
}


def test_replies_carry_ciphertexts_sealed_bytes_and_public_keys_only(run5):
    strategy, grid, _, hospitals, _ = run5
    counts = {len(h.train_labels) for h in hospitals} | {len(h.test_labels) for h in hospitals}
    agg = strategy.cipher.agg
    for reply in grid.received:
        assert set(reply.content[M.RECORD].keys()) <= ALLOWED_REPLY_KEYS
        for key, item in _values(reply):
            assert not isinstance(item, float), key
            if isinstance(item, int):
                assert item not in counts, (key, item)
            if key == M.UPDATE:  # each part is a ciphertext under the joint public key
                for part in unframe(item):
                    agg.add([part])


# --- the command line, as users run it ----------------------------------------------------------

CLI = """
import json, sys
from medfed.simulate import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "timm", "tenseal", "torchvision") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_cli_threshold_run_from_a_features_file_with_a_dropout(tmp_path):
    hospitals = make_hospitals(n=600, d=10, n_classes=2, seed=11)
    np.savez(
        tmp_path / "f.npz",
        train_features=np.vstack([h.train_features for h in hospitals]).astype(np.float32),
        train_labels=np.concatenate([h.train_labels for h in hospitals]),
        test_features=np.vstack([h.test_features for h in hospitals]).astype(np.float32),
        test_labels=np.concatenate([h.test_labels for h in hospitals]),
        dataset="toy",
    )
    out = tmp_path / "run"
    args = ["--mode", "updates", "--keys", "threshold", "--features", str(tmp_path / "f.npz")]
    args += ["--hospitals", "5", "--rounds", "3", "--dropouts", "1", "--no-progress"]
    args += ["--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=300
    )
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == {"code": 0, "heavy": []}, done.stderr[-2000:]
    assert "threshold decryptions" in done.stdout  # the summary row: used / budget
    m = json.loads((out / "metrics.json").read_text())
    # decryptions: 3 rounds + final, and the partial round redone after the dropout
    assert m["threshold"] == {
        "t": 3,
        "n": 5,
        "tolerates": 2,
        "decryptions": 5,
        "max_decryptions": 1024,
    }
    assert m["dropouts"] == 1 and len(m["dropped"]) == 1 and m["backend"] == "flower"
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.005
    assert m["bytes_per_round"]["sent"] > 0 and m["rounds"] == 3


def test_hospitals_refuse_parameters_without_noise_flooding(tmp_path, test_params):
    from dataclasses import replace

    from medfed.crypto.errors import KeyMaterialError
    from medfed.fl.ciphers import ThresholdHospital

    weak = replace(test_params.with_parties(3), noise_flooding=False)
    hospital = ThresholdHospital(str(tmp_path), 0)
    with pytest.raises(KeyMaterialError, match="noise flooding"):
        hospital.setup("context", {M.THRESHOLD_CONTEXT: json.dumps(weak.to_dict())})
