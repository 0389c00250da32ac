"""OpenFHE threshold CKKS: joint keys, flooded partial decryptions, Shamir dropout recovery.

Runs only where `openfhe` imports (the Python 3.10 environment: tests/threshold/README.md).
Tolerance: a fused decryption is exact up to ``context.tolerance`` per slot (8 standard
deviations of the flooding noise, about 0.02-0.04 absolute at the test preset), whatever the
magnitude of the values; after FedAvg normalisation by the total sample count the weights
match the plaintext FedAvg to 2 * tolerance / total count (< 1e-5 here).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

openfhe = pytest.importorskip("openfhe")

from medfed.crypto.channel import ChannelError, Identity, channel_context, open_sealed  # noqa: E402
from medfed.crypto.threshold import (  # noqa: E402
    PURPOSE_PARTIAL,
    THRESHOLD_PRESETS,
    ThresholdContext,
    ThresholdError,
    ThresholdParams,
    ThresholdParamsError,
    _unpack_partials,
)

pytestmark = pytest.mark.openfhe

D, K = 191, 20  # (d + 1) * K head weights + 1 sample count = 3821 values


def hospital_updates(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Sample-weighted head updates [n_k * W_k, n_k] and the plaintext FedAvg weights."""
    rng = np.random.default_rng(seed)
    updates, weights, counts = [], [], []
    for _ in range(n):
        n_k = int(rng.integers(200, 5000))
        w_k = rng.normal(scale=0.5, size=D * K)
        updates.append(np.concatenate([n_k * w_k, [n_k]]))
        weights.append(w_k)
        counts.append(n_k)
    fedavg = sum(c * w for c, w in zip(counts, weights, strict=True)) / sum(counts)
    return updates, fedavg


def aggregate_of(fed, vectors) -> bytes:
    """Each hospital encrypts its vector; the aggregator adds the ciphertexts."""
    return fed.aggregator.add([p.encrypt(v) for p, v in zip(fed.parties, vectors, strict=True)])


def assert_fedavg(got: np.ndarray, fedavg: np.ndarray, context) -> None:
    """Weights = decrypted sum / decrypted sample count, accurate to ~tolerance / total count."""
    atol = 2 * context.tolerance / got[-1]
    assert atol < 1e-5
    np.testing.assert_allclose(got[:-1] / got[-1], fedavg, rtol=0, atol=atol)


def decrypt_together(fed, aggregate: bytes, holders, fuser, *, round: int = 1) -> np.ndarray:
    """Every holder partially decrypts; all but the fuser seal to the fuser; the fuser fuses."""
    envelopes = []
    for p in holders:
        env = p.partial_decrypt(aggregate)
        if p is fuser:
            envelopes.append(env)
        else:
            sealed = p.seal_to(fuser.index, env, round=round)  # relayed by the aggregator
            envelopes.append(fuser.open_from(p.index, sealed, round=round))
    return fuser.fuse(aggregate, envelopes, length=D * K + 1)


# --- parameters ------------------------------------------------------------------------------


def test_params_validation():
    assert THRESHOLD_PRESETS["default"].ring_dim == 16384
    assert THRESHOLD_PRESETS["test"].ring_dim == 8192
    assert ThresholdParams().with_parties(5).threshold == 3
    bad = [
        dict(parties=3, threshold=4),  # t > n
        dict(parties=3, threshold=0),
        dict(parties=4, threshold=2),  # OpenFHE Shamir needs a majority
        dict(parties=1, threshold=1),
        dict(security="HEStd_NotSet"),
        dict(multiplicative_depth=0),  # sums wrap silently above ~2 at depth 0
        dict(batch_size=16384),  # > N/2
        dict(key_switching="GHS"),
        dict(max_decryptions=0),
    ]
    for kw in bad:
        with pytest.raises(ThresholdParamsError):
            ThresholdParams(**kw)


def test_test_preset_is_the_smallest_ring_openfhe_accepts():
    smaller = ThresholdParams(ring_dim=4096, batch_size=2048, key_switching="BV", max_decryptions=1)
    with pytest.raises(ThresholdParamsError, match="does not comply"):
        ThresholdContext.generate(smaller)
    hybrid = ThresholdParams(ring_dim=8192, batch_size=4096, key_switching="HYBRID")
    with pytest.raises(ThresholdParamsError, match="does not comply"):
        ThresholdContext.generate(hybrid)


def test_context_roundtrip_and_tamper(fed3):
    wire = fed3.context.to_bytes()
    assert len(wire) < 4096  # parameters only: no key fits in here
    again = ThresholdContext.from_bytes(wire)
    assert again.params == fed3.context.params
    assert again.noise_estimate == fed3.context.noise_estimate
    with pytest.raises(ThresholdError):
        ThresholdContext.from_bytes(b"garbage" + wire)
    # a header that misstates the OpenFHE context (e.g. a smaller noise estimate) is refused
    size = int.from_bytes(wire[8:12], "big")
    header = json.loads(wire[12 : 12 + size])
    header["noise_estimate"] = 20.0
    forged = json.dumps(header).encode()
    tampered = wire[:8] + len(forged).to_bytes(4, "big") + forged + wire[12 + size :]
    with pytest.raises(ThresholdError, match="disagree"):
        ThresholdContext.from_bytes(tampered)


# --- the encrypted sum -------------------------------------------------------------------------


@pytest.mark.parametrize("fed_name", ["fed3", "fed5"])
def test_encrypted_sum_decrypts_to_plain_sum(fed_name, request):
    fed = request.getfixturevalue(fed_name)
    n = len(fed.parties)
    updates, fedavg = hospital_updates(n)
    aggregate = aggregate_of(fed, updates)
    expected = np.sum(updates, axis=0)

    got = decrypt_together(fed, aggregate, fed.parties, fed.party(n))
    err = np.max(np.abs(got - expected))
    assert err <= fed.context.tolerance, (err, fed.context.tolerance)
    assert err <= 1e-6 * np.max(np.abs(expected))
    assert got[-1] == pytest.approx(expected[-1], abs=fed.context.tolerance)
    assert_fedavg(got, fedavg, fed.context)

    # every hospital can fuse (each from the others' sealed partials) and they agree
    other = decrypt_together(fed, aggregate, fed.parties, fed.party(1), round=2)
    assert np.max(np.abs(other - expected)) <= fed.context.tolerance


def test_noise_flooding_is_applied(federation):
    """Flooded partial decryptions are far noisier than OpenFHE's fixed 2**20 smudging."""
    errors = {}
    for flooding in (True, False):
        params = ThresholdParams(
            ring_dim=8192, batch_size=4096, key_switching="BV", noise_flooding=flooding
        )
        fed = federation(params, share=False)
        assert (fed.context.noise_estimate is not None) == flooding
        x = [np.full(4096, 0.25 * (i + 1)) for i in range(3)]
        aggregate = aggregate_of(fed, x)
        envelopes = [p.partial_decrypt(aggregate) for p in fed.parties]
        got = fed.party(1).fuse(aggregate, envelopes)
        errors[flooding] = float(np.std(got - np.sum(x, axis=0)))
        assert np.max(np.abs(got - np.sum(x, axis=0))) <= fed.context.tolerance
    # flooding sigma 2^(16.8 + estimate) vs 2^20: about 2^22 times more noise
    assert errors[True] > 1e4 * errors[False], errors
    # partial decryptions are randomized: the same party decrypting twice gives other bytes
    assert fed.party(2).partial_decrypt(aggregate) != fed.party(2).partial_decrypt(aggregate)


# --- what the aggregator holds ---------------------------------------------------------------


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
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    for child in children:
        yield from _walk(child, seen)


def test_aggregator_holds_no_secret_key(fed3):
    agg = fed3.aggregator
    objects = list(_walk(agg))
    assert not any(isinstance(o, openfhe.PrivateKey) for o in objects)
    assert not any(isinstance(o, Identity) for o in objects)
    for name in ("partial_decrypt", "fuse", "recover_key", "share_key", "keygen"):
        assert not hasattr(agg, name)
    # its serializable state is the public context: parameters only, a few hundred bytes
    assert len(agg.context.to_bytes()) < 4096
    # a party's secret state never pickles
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(fed3.party(1))
    # for comparison: the party does hold a private key object
    assert any(isinstance(o, openfhe.PrivateKey) for o in _walk(fed3.party(1)))


AGGREGATOR_PROCESS = """
import sys
from medfed.crypto.threshold import ThresholdAggregator
data = sys.stdin.buffer.read()
parts, off = [], 0
while off < len(data):
    size = int.from_bytes(data[off : off + 8], "big")
    parts.append(data[off + 8 : off + 8 + size])
    off += 8 + size
context, joint, cts = parts[0], parts[1], parts[2:]
sys.stdout.buffer.write(ThresholdAggregator(context, joint).add(cts))
"""


def test_aggregator_in_its_own_process_works_on_bytes_only(fed3):
    """A process that never saw a key share gets context, joint key and ciphertexts as bytes."""
    updates, _ = hospital_updates(3, seed=4)
    blobs = [fed3.context.to_bytes(), fed3.joint_public_key]
    blobs += [p.encrypt(u) for p, u in zip(fed3.parties, updates, strict=True)]
    stdin = b"".join(len(b).to_bytes(8, "big") + b for b in blobs)
    done = subprocess.run(
        [sys.executable, "-c", AGGREGATOR_PROCESS], input=stdin, capture_output=True, check=True
    )
    aggregate = done.stdout
    got = decrypt_together(fed3, aggregate, fed3.parties, fed3.party(2), round=9)
    assert np.max(np.abs(got - np.sum(updates, axis=0))) <= fed3.context.tolerance


def test_aggregator_refuses_foreign_or_excess_ciphertexts(fed3, fed5):
    ct3 = fed3.party(1).encrypt(np.ones(10))
    with pytest.raises(ThresholdError, match="joint public key"):
        fed5.aggregator.add([fed5.party(1).encrypt(np.ones(10)), ct3])
    with pytest.raises(ThresholdError, match="at most parties"):
        fed3.aggregator.add([ct3] * 4)
    with pytest.raises(ThresholdError):
        fed3.aggregator.add([b"not a ciphertext"])


def test_partials_sealed_for_hospitals_cannot_be_opened_by_the_aggregator(fed3):
    p1, p2 = fed3.party(1), fed3.party(2)
    aggregate = fed3.aggregator.add([p.encrypt(np.ones(8)) for p in fed3.parties])
    sealed = p2.seal_to(1, p2.partial_decrypt(aggregate), round=7)

    aggregator_identity = Identity.generate()
    ctx = channel_context(p1.run_id, 7, "party-2", "party-1", PURPOSE_PARTIAL)
    with pytest.raises(ChannelError, match="another recipient"):
        open_sealed(aggregator_identity, p2.public_bundle, sealed, ctx)
    with pytest.raises(ThresholdError):  # opaque: not a ciphertext, not a partial
        fed3.aggregator.context._ciphertext(sealed, "relayed bytes")
    with pytest.raises(ThresholdError, match="bad magic"):
        _unpack_partials(sealed)
    with pytest.raises(ChannelError, match="another recipient"):  # hospital 3 cannot either
        fed3.party(3).open_from(2, sealed, round=7)
    with pytest.raises(ChannelError, match="another context"):  # replay into another round
        p1.open_from(2, sealed, round=8)
    assert _unpack_partials(p1.open_from(2, sealed, round=7))[1][0][0] == 2


def test_a_product_is_not_partially_decrypted(fed3):
    """A malicious aggregator multiplies before asking: at scaling degree 2 the flooding is
    2^p times too small to hide the key share, so no party decrypts it (control: the sum)."""
    updates, _ = hospital_updates(3, seed=2)
    aggregate = aggregate_of(fed3, updates)
    fed3.party(2).partial_decrypt(aggregate)  # the protocol's sum: decrypted
    cc = fed3.context._cc
    ct = fed3.context._ciphertext(aggregate, "aggregate")
    scaled = cc.EvalMult(ct, cc.MakeCKKSPackedPlaintext([0.5] * 8))
    assert scaled.GetNoiseScaleDeg() == 2
    with pytest.raises(ThresholdError, match="scaling degree 2"):
        fed3.party(2).partial_decrypt(fed3.context._serialize(scaled))


# --- fewer than all shares / fewer than t hospitals -------------------------------------------


def test_fewer_partials_cannot_decrypt(fed3):
    updates, _ = hospital_updates(3, seed=1)
    aggregate = aggregate_of(fed3, updates)
    expected = np.sum(updates, axis=0)
    envelopes = [p.partial_decrypt(aggregate) for p in fed3.parties]

    for subset in ([0, 1], [0, 2], [1, 2]):
        with pytest.raises(ThresholdError, match="missing"):
            fed3.party(1).fuse(aggregate, [envelopes[i] for i in subset])

    # beneath the API: OpenFHE fusion of 2 of 3 partials is garbage (or refuses to decode)
    cc = fed3.context._cc
    parts = [
        openfhe.DeserializeCiphertextString(_unpack_partials(e)[1][0][1], openfhe.BINARY)
        for e in envelopes
    ]
    for subset in ([0, 1], [0, 2]):
        try:
            pt = cc.MultipartyDecryptFusion([parts[i] for i in subset])
            pt.SetLength(len(expected))
            garbage = np.asarray(pt.GetRealPackedValue())
            assert np.max(np.abs(garbage - expected)) > 1e6
        except RuntimeError as e:
            assert "approximation error is too high" in str(e)

    # duplicates, a second lead, or partials of another ciphertext are refused too
    with pytest.raises(ThresholdError, match="twice"):
        fed3.party(1).fuse(aggregate, envelopes + [envelopes[1]])
    other = fed3.aggregator.add([fed3.party(1).encrypt(np.ones(4))])
    with pytest.raises(ThresholdError, match="another ciphertext"):
        fed3.party(1).fuse(other, envelopes)


def test_fewer_than_t_hospitals_cannot_recover_a_share(fed5):
    # t = 3: the recoverer's own share plus one other is not enough
    recoverer, helper = fed5.party(1), fed5.party(2)
    sealed = {2: helper.recovery_share(5, recoverer.index, round=3)}
    with pytest.raises(ThresholdError, match="needs t=3"):
        recoverer.recover_key(5, sealed, round=3)
    assert recoverer.key_shares == (1,)


# --- dropouts ----------------------------------------------------------------------------------


def recover(fed, dropped: int, recoverer, helpers, *, round: int) -> None:
    sealed = {h.index: h.recovery_share(dropped, recoverer.index, round=round) for h in helpers}
    recoverer.recover_key(dropped, sealed, round=round)


def test_dropout_recovered_with_t_of_n(federation, test_params):
    fed = federation(test_params.with_parties(3, 2))
    updates, fedavg = hospital_updates(3, seed=2)
    p1, p2, p3 = fed.parties
    # all three encrypt; hospital 1 (holder of the lead share) drops before decryption
    aggregate = aggregate_of(fed, updates)
    recover(fed, 1, p2, [p3], round=4)  # t = 2 shares: p2's own + p3's
    assert p2.key_shares == (1, 2)
    got = decrypt_together(fed, aggregate, [p2, p3], p3, round=4)
    assert np.max(np.abs(got - np.sum(updates, axis=0))) <= fed.context.tolerance
    assert_fedavg(got, fedavg, fed.context)
    # without the recovery, the two survivors are refused
    with pytest.raises(ThresholdError, match=r"missing"):
        p3.fuse(aggregate, [p3.partial_decrypt(aggregate)])


def test_two_dropouts_of_five_with_t3(federation, test_params):
    fed = federation(test_params.with_parties(5, 3))
    updates, fedavg = hospital_updates(5, seed=3)
    aggregate = aggregate_of(fed, updates)
    p1, p2, p3, _, _ = fed.parties  # hospitals 4 and 5 disappear after key setup
    recover(fed, 4, p1, [p2, p3], round=5)
    recover(fed, 5, p2, [p1, p3], round=5)
    got = decrypt_together(fed, aggregate, [p1, p2, p3], p3, round=5)
    assert np.max(np.abs(got - np.sum(updates, axis=0))) <= fed.context.tolerance
    assert_fedavg(got, fedavg, fed.context)


# --- input checks ------------------------------------------------------------------------------


def test_encrypt_rejects_bad_vectors(fed3):
    p = fed3.party(1)
    with pytest.raises(ThresholdError, match="length"):
        p.encrypt(np.zeros(fed3.context.slots + 1))
    with pytest.raises(ThresholdError, match="non-finite"):
        p.encrypt([1.0, float("nan")])
    with pytest.raises(ThresholdError, match="wrap"):
        p.encrypt([fed3.context.max_abs_value])
