"""Bad input is rejected at the boundary with an error naming the party, the item and the fix."""

import io
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medfed.config import ConfigError, SimulationConfig
from medfed.crypto.context import (
    MAX_CIPHERTEXT_BYTES,
    CiphertextError,
    load_ciphertext,
    load_public_context,
    make_secret_context,
    public_context_bytes,
)
from medfed.crypto.diagonal import pack_diagonal, plan_diagonal
from medfed.crypto.packing import LayoutError
from medfed.crypto.params import (
    MAX_LOG_Q_128,
    PRESETS,
    REFRESH_HEADROOM_BITS,
    CKKSParams,
    UnsafeParametersError,
    params_from_dict,
)
from medfed.crypto.seal import SealEngine
from medfed.data import DatasetError, load_dataset
from medfed.fl import messages as M
from medfed.fl.workspace import ERRORS, HospitalData, check_hospitals, hospital_dir
from medfed.runner import federate
from medfed.train.diagonal.keyholder import hospital_sums
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import excluded, provision_all, rewrite_reply, run_local

FIX_WORDS = ("must", "use ", "set ", "re-", "give", "fix", "pass", "drop", "make", "check")
PARAMS = PRESETS["fast"]


def names_fix(message: str) -> bool:
    return any(w in message.lower() for w in FIX_WORDS)


@pytest.fixture(scope="module")
def engines():
    secret = make_secret_context(PARAMS)
    public = load_public_context(public_context_bytes(secret))
    hospital = SealEngine(secret)
    return hospital, SealEngine(public), hospital.to_bytes(hospital.encrypt(np.ones(PARAMS.slots)))


# ----------------------------------------------------------------------------- ciphertexts

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_not_a_ciphertext(engines, data):
    _, aggregator, _ = engines
    with pytest.raises(CiphertextError) as info:
        aggregator.from_bytes(data, sender="hospital-2", item="feature 7")
    message = str(info.value)
    assert "feature 7 from hospital-2" in message and names_fix(message)


@SLOW
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_ciphertexts_are_rejected(engines, cut):
    _, aggregator, good = engines
    with pytest.raises(CiphertextError, match="mask from hospital-0 is not a valid ciphertext"):
        aggregator.from_bytes(good[: int(cut * len(good))], sender="hospital-0", item="mask")


@SLOW
@given(data=st.binary(max_size=2048), cut=st.floats(0, 1, exclude_max=True))
def test_malformed_public_contexts_are_rejected(engines, data, cut):
    hospital, _, _ = engines
    good = public_context_bytes(hospital.ctx)
    for blob in (data, good[: int(cut * len(good))]):
        with pytest.raises(CiphertextError, match="public context from hospital-0 is malformed"):
            load_public_context(blob, sender="hospital-0")


@pytest.mark.parametrize("preset", ["standard", "deep"])
def test_ciphertexts_under_other_parameters_are_rejected(engines, preset):
    _, aggregator, _ = engines
    other = SealEngine(make_secret_context(PRESETS[preset]))
    blob = other.to_bytes(other.encrypt(np.ones(other.slots)))
    with pytest.raises(CiphertextError, match="labels from hospital-3") as info:
        aggregator.from_bytes(blob, sender="hospital-3", item="labels")
    assert names_fix(str(info.value))


def test_oversized_and_non_bytes_payloads_are_rejected(engines):
    hospital, aggregator, good = engines
    huge = bytes(MAX_CIPHERTEXT_BYTES + 1)
    with pytest.raises(CiphertextError, match="stats from hospital-1 is .* over the"):
        aggregator.from_bytes(huge, sender="hospital-1", item="stats")
    with pytest.raises(CiphertextError, match="expected ciphertext bytes, got str"):
        aggregator.from_bytes("not bytes", sender="hospital-1", item="stats")
    with pytest.raises(CiphertextError, match="over the"):  # the TenSEAL path too
        load_ciphertext(hospital.ctx, huge, size=4, sender="hospital-1", item="stats")


def test_wrong_vector_lengths_and_counts_are_rejected(engines):
    hospital, _, good = engines
    import tenseal as ts

    short = ts.ckks_vector(hospital.ctx, [1.0, 2.0, 3.0]).serialize()
    with pytest.raises(CiphertextError, match="has 3 slots, expected 8.*slot layout"):
        load_ciphertext(hospital.ctx, short, size=8, sender="hospital-1", item="x")
    with pytest.raises(ValueError, match=f"expected {PARAMS.slots} slot values"):
        hospital.encrypt(np.ones(PARAMS.slots - 1))
    layout = plan_diagonal([1], slots=PARAMS.slots, n_classes=2, bucket=32, n_features=4)
    with pytest.raises(CiphertextError, match="the aggregator sent 1 masked vectors; expected"):
        hospital_sums(hospital, [good], layout)
    with pytest.raises(LayoutError, match="columns"):
        pack_diagonal(np.zeros((3, 5)), np.zeros(3, int), layout, 0)


# ----------------------------------------------------------------------------- federation


def test_a_hospital_under_another_key_is_excluded_at_stats(tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    provision_all(tmp_path, hospitals, keys={2: make_secret_context(PARAMS)})
    _, _, result = run_local(tmp_path, 3)
    (bad,) = excluded(result, "stats")
    assert bad["hospital"] == "hospital-2"
    assert "different key set" in bad["reason"] and "re-provision" in bad["reason"]
    assert result["contributors"]["upload"] == ["hospital-0", "hospital-1"]


def test_wrong_number_of_ciphertexts_excludes_the_upload(tmp_path):
    def drop_one(values, index):
        if index == 1:
            values[M.FEATURES] = list(values[M.FEATURES])[:-1]
        return values

    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    provision_all(tmp_path, hospitals)
    _, _, result = run_local(tmp_path, 3, mods=[rewrite_reply("upload", drop_one)])
    (bad,) = excluded(result, "upload")
    assert bad["hospital"] == "hospital-1"
    assert "feature/mask/label ciphertexts, expected" in bad["reason"]


def test_a_key_holder_answering_with_the_wrong_count_is_replaced(tmp_path):
    def short(values, index):
        if index == 2:  # in LocalGrid, hospital-2 holds sum-0
            values[M.SUMS] = list(values[M.SUMS])[:-1]
        return values

    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    provision_all(tmp_path, hospitals)
    mod = rewrite_reply("sum-0", short)
    _, _, result = run_local(tmp_path, 3, mods=[mod])
    (bad,) = excluded(result, "sum-0")
    assert bad["hospital"] == "hospital-2"
    assert "returned 1 sums in the masked-sum round, expected 2" in bad["reason"]
    assert len(result["refreshes"]) == 3
    assert "hospital-2" not in {r["hospital"] for r in result["refreshes"]}


def test_a_key_holder_answering_garbage_is_replaced(tmp_path):
    def garbage(values, index):
        if index == 1:  # in LocalGrid, hospital-1 holds sum-1
            values[M.SUMS] = [b"\x00garbage" * 10 for _ in values[M.SUMS]]
        return values

    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    provision_all(tmp_path, hospitals)
    _, _, result = run_local(tmp_path, 3, mods=[rewrite_reply("sum-1", garbage)])
    (bad,) = excluded(result, "sum-1")
    assert bad["hospital"] == "hospital-1" and "is not a valid ciphertext" in bad["reason"]
    assert len(result["refreshes"]) == 3


def test_nan_embeddings_at_a_hospital_stay_private_and_exclude_it(tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    hospitals[1].train_features[3, 2] = np.nan
    provision_all(tmp_path, hospitals)
    _, _, result = run_local(tmp_path, 3)
    (bad,) = excluded(result, "stats")
    assert bad["reason"] == "hospital-1: stats failed; details are in the hospital's own errors.log"
    log = (hospital_dir(tmp_path, 1) / ERRORS).read_text()
    assert "hospital-1: embeddings contain NaN/Inf; re-embed" in log


def test_a_hospital_with_another_embedding_size_is_excluded_at_stats(tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    odd = synthetic_hospitals(n_hospitals=3, n=157, d=6)[2]
    hospitals[2] = odd
    provision_all(tmp_path, hospitals)
    _, _, result = run_local(tmp_path, 3)
    (bad,) = result["excluded"]
    assert bad["stage"] == "stats" and bad["hospital"] == "hospital-2"
    assert "6 features, the run uses 8" in bad["reason"]
    assert result["contributors"]["stats"] == ["hospital-0", "hospital-1"]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda h: h.train_features.__setitem__((0, 0), np.inf), "train_features contains NaN"),
        (lambda h: h.test_labels.__setitem__(0, 7), r"test_labels must be integer class"),
        (lambda h: h.train_labels.__setitem__(0, -1), r"train_labels must be integer class"),
    ],
)
def test_federate_checks_hospital_data_before_any_crypto(change, match):
    hospitals = synthetic_hospitals(n_hospitals=3, n=157, d=8)
    change(hospitals[1])
    cfg = SimulationConfig(hospitals=3, backend="local", epochs=1, progress=False)
    with pytest.raises(DatasetError, match=f"hospital-1: {match}") as info:
        federate(cfg, hospitals, 2, {"dataset": "synthetic"})
    assert names_fix(str(info.value))


def test_check_hospitals_catches_mismatches():
    hs = synthetic_hospitals(n_hospitals=2, n=100, d=8)
    odd = synthetic_hospitals(n_hospitals=2, n=100, d=5)[1]
    with pytest.raises(DatasetError, match="hospital-1: train_features has 5 features.*--model"):
        check_hospitals([hs[0], odd], 2)
    with pytest.raises(DatasetError, match="not unique"):
        check_hospitals([hs[0], hs[0]], 2)
    h = hs[0]
    bad = HospitalData("h", h.train_features, h.train_labels[:-1], h.test_features, h.test_labels)
    with pytest.raises(DatasetError, match="h: train_labels has shape"):
        check_hospitals([bad], 2)


@given(labels=st.lists(st.integers(-3, 6), min_size=1, max_size=30))
def test_labels_out_of_range_never_reach_a_ciphertext(labels):
    y = np.array(labels)
    layout = plan_diagonal([1], slots=PARAMS.slots, n_classes=3, bucket=32, n_features=2)
    x = np.zeros((len(y), 2))
    if y.min() < 0 or y.max() >= 3:
        with pytest.raises(LayoutError, match="class indices in 0..2"):
            pack_diagonal(x, y, layout, 0)
    else:
        pack_diagonal(x, y, layout, 0)


# ----------------------------------------------------------------------------- npz files


def _npz_bytes(labels_max=1, n=6):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28)).astype(np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, labels_max + 1, (n, 1))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), arrays


GOOD_NPZ, GOOD_ARRAYS = _npz_bytes()


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, len(GOOD_NPZ) - 1))
def test_truncated_npz_files_name_the_file(tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("npz") / "BROKEN.npz"
    path.write_bytes(GOOD_NPZ[:cut])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert "BROKEN.npz" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_files_name_the_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("npz") / "random.npz"
    path.write_bytes(data)
    with pytest.raises(DatasetError, match="random.npz"):
        load_dataset(path)


@settings(max_examples=40, deadline=None)
@given(bad=st.integers(2, 20), split=st.sampled_from(["train", "val", "test"]))
def test_labels_out_of_range_for_a_known_dataset(tmp_path_factory, bad, split):
    arrays = dict(GOOD_ARRAYS)
    labels = arrays[f"{split}_labels"].copy()
    labels[0, 0] = bad
    arrays[f"{split}_labels"] = labels
    path = tmp_path_factory.mktemp("npz") / "breastmnist.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=f"breastmnist.npz: found label {bad}.*fix the labels"):
        load_dataset(path)


def test_mismatched_arrays_name_the_array(tmp_path):
    arrays = dict(GOOD_ARRAYS)
    arrays["test_labels"] = arrays["test_labels"][:-1]
    np.savez(tmp_path / "mine.npz", **arrays)
    with pytest.raises(
        DatasetError, match="mine.npz: test_labels has 5 entries.*exactly one label"
    ):
        load_dataset(tmp_path / "mine.npz")
    with zipfile.ZipFile(tmp_path / "zip.npz", "w") as z:
        z.writestr("train_images.npy", b"not an array")
    with pytest.raises(DatasetError, match="zip.npz"):
        load_dataset(tmp_path / "zip.npz")


# ----------------------------------------------------------------------------- CKKS params


@settings(max_examples=80)
@given(
    n=st.sampled_from([1000, 2048, 4096, 8192, 16384, 32768, 65536]),
    chain=st.lists(st.integers(10, 70), min_size=1, max_size=12),
    scale=st.integers(10, 70),
    security=st.sampled_from([80, 128, 192]),
)
def test_ckks_params_are_safe_or_rejected_with_a_fix(n, chain, scale, security):
    try:
        p = CKKSParams(n, tuple(chain), scale, security_bits=security)
    except UnsafeParametersError as e:
        assert names_fix(str(e)), str(e)
        return
    assert p.security_bits == 128 and p.log_q <= MAX_LOG_Q_128[p.poly_modulus_degree]
    data = p.coeff_mod_bit_sizes[:-1]
    assert p.depth >= 1 and all(b == scale for b in data[len(data) - p.depth :])
    assert all(b >= scale for b in p.refresh_primes)
    assert p.refresh_headroom_bits >= REFRESH_HEADROOM_BITS


def test_params_from_dict_names_missing_and_unknown_keys():
    with pytest.raises(UnsafeParametersError, match="give poly_modulus_degree"):
        params_from_dict({"poly_modulus_degree": 8192})
    with pytest.raises(UnsafeParametersError, match="unknown CKKS parameter keys"):
        params_from_dict({"n": 8192})


# ----------------------------------------------------------------------------- config keys

FIELDS = set(SimulationConfig.field_names())


@given(key=st.from_regex(r"[a-z][a-z_]{0,20}", fullmatch=True))
def test_unknown_config_keys_are_named(key):
    assume(key not in FIELDS)
    with pytest.raises(ConfigError, match=f"unknown key\\(s\\) '{key}'.*valid keys"):
        SimulationConfig.from_dict({key: 1}, source="c.yaml")


@pytest.mark.parametrize(
    "key,value",
    [
        ("hospitals", 0),
        ("hospitals", "3"),
        ("epochs", 2.5),
        ("lr", -1),
        ("split", "random"),
        ("ckks", "fats"),
        ("sigmoid_degree", 4),
        ("bucket", True),
        ("inject", ["explode:hospital=1"]),
    ],
)
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        SimulationConfig.from_dict({key: value}, source="c.yaml")
    text = str(info.value)
    assert key.split("_")[0] in text or "--inject" in text or "preset" in text
