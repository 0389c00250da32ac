"""The mode registry (medfed.modes), the RunResult every run returns, and typed provisioning."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

import medfed
from medfed import config as C
from medfed.config import ConfigError, SimulationConfig
from medfed.fl.workspace import HospitalProvision, load_provision, provision
from medfed.modes import Mode, UnknownModeError, get_mode, register_mode, unregister_mode
from medfed.modes.common import described_run, finish
from medfed.result import RunResult
from tests.conftest import synthetic_hospitals


def test_the_built_in_modes_are_registered_in_order():
    assert medfed.list_modes()[:2] == ["embeddings", "updates"]
    for name in medfed.list_modes():
        mode = medfed.get_mode(name)
        assert isinstance(mode, Mode) and mode.name == name and mode.keys
        assert C.MODE_KEYS[name] == mode.keys and get_mode(name) is mode
    assert get_mode("updates").options == {
        "dropouts": 0,
        "features": None,
        "dp_epsilon": None,
        "dp_noise": None,
        "dp_delta": 1e-5,
        "dp_clip": 1.0,
    }
    assert C.MODES == tuple(medfed.list_modes()) and C.KEY_SETUPS == ("none", "shared", "threshold")


def test_an_unknown_mode_names_the_choices():
    with pytest.raises(UnknownModeError, match="choose one of embeddings, updates") as e:
        get_mode("embedings")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, KeyError)
    with pytest.raises(ConfigError, match="is not one of embeddings, updates"):
        SimulationConfig(mode="embedings")
    with pytest.raises(ConfigError, match="Mode 'embeddings' supports keys shared"):
        SimulationConfig(mode="embeddings", keys="none")


def test_import_medfed_and_the_registry_load_no_torch_tenseal_or_flower():
    code = (
        "import sys, medfed; medfed.SimulationConfig(mode='updates', keys='none'); "
        "[medfed.get_mode(m) for m in medfed.list_modes()]; medfed.RunResult; "
        "print(sorted(m for m in ('torch', 'timm', 'tenseal', 'flwr', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class MajorityMode(Mode):
    """A registered test mode: predict every hospital's pooled majority class, no federation."""

    name = "majority-test"
    keys = ("none",)
    calls: list = []

    def validate(self, cfg: SimulationConfig) -> None:
        if cfg.epochs > 50:
            raise ConfigError("mode 'majority-test' trains at most 50 epochs")

    def federate(self, cfg, hospitals, n_classes, described, started=None) -> dict:
        self.calls.append(len(hospitals))
        train = np.concatenate([h.train_labels for h in hospitals])
        test = np.concatenate([h.test_labels for h in hospitals])
        accuracy = float(np.mean(test == np.bincount(train).argmax()))
        metrics = {
            **described_run(cfg, described, n_classes, hospitals[0].train_features.shape[1]),
            "accuracy": accuracy,
            "auc": float("nan"),
            "plaintext_accuracy": accuracy,
            "bytes_up": 0,
            "bytes_down": 0,
            "bytes_per_party": {},
            "excluded": [],
        }
        return finish(cfg, metrics, [{"stage": "none"}])


@pytest.fixture
def majority_mode():
    mode = register_mode(MajorityMode())
    yield mode
    unregister_mode(mode.name)
    MajorityMode.calls.clear()


def test_a_registered_mode_is_validated_and_dispatched_by_federate(majority_mode, tmp_path):
    assert "majority-test" in medfed.list_modes() and C.MODE_KEYS["majority-test"] == ("none",)
    with pytest.raises(ConfigError, match="at most 50 epochs"):
        SimulationConfig(mode="majority-test", keys="none", epochs=60)
    with pytest.raises(ConfigError, match="supports keys none"):
        SimulationConfig(mode="majority-test", keys="shared")
    with pytest.raises(ConfigError, match="dropouts applies to mode 'embeddings' or 'updates'"):
        SimulationConfig(mode="majority-test", keys="none", dropouts=1)
    cfg = SimulationConfig(mode="majority-test", keys="none", out=str(tmp_path))
    hospitals = synthetic_hospitals(n_hospitals=3, n=90, d=4)
    result = medfed.federate(cfg, hospitals)
    assert majority_mode.calls == [3] and isinstance(result, RunResult)
    assert (result.mode, result.key_setup, result.hospitals) == ("majority-test", "none", 3)
    assert result.to_dict() == json.loads((tmp_path / "metrics.json").read_text())
    assert result.to_dict()["auc"] is None and np.isnan(result["auc"])
    console = Console(record=True, width=120)
    medfed.print_summary(result, console)  # no table of its own: the generic one
    assert "mode majority-test, none keys" in console.export_text()
    with pytest.raises(ValueError, match="already registered"):
        register_mode(MajorityMode())


def test_base_options_of_one_mode_stay_out_of_the_other_modes_cells(majority_mode):
    from medfed.experiments.sweep import SweepError, SweepSpec

    spec = {
        "base": {"dropouts": 1, "epochs": 2, "keys": "none"},
        "grid": {"mode": ["majority-test", "updates"]},
    }
    other, upd = SweepSpec.from_dict(spec).cells()
    assert (other.config.mode, other.config.dropouts, other.config.epochs) == (
        "majority-test",
        0,
        2,
    )
    assert (upd.config.mode, upd.config.dropouts) == ("updates", 1)
    bad = {"base": {"keys": "none"}, "grid": {"mode": ["majority-test"], "dropouts": [1]}}
    with pytest.raises(SweepError, match="dropouts applies to mode 'embeddings' or 'updates'"):
        SweepSpec.from_dict(bad).cells()


def test_an_unregistered_mode_is_gone_and_built_in_ones_stay(majority_mode):
    unregister_mode("majority-test")
    assert "majority-test" not in medfed.list_modes()
    with pytest.raises(ConfigError, match="not one of embeddings, updates"):
        SimulationConfig(mode="majority-test", keys="none")
    unregister_mode("updates")  # a built-in mode comes back
    assert get_mode("updates").name == "updates" and SimulationConfig(mode="updates")


@pytest.mark.parametrize("mode", medfed.list_modes())
def test_every_mode_returns_a_run_result_that_is_its_metrics_json(mode, tmp_path):
    hospitals = synthetic_hospitals(n_hospitals=3, n=150, d=6, n_classes=2, seed=4)
    cfg = SimulationConfig(
        mode=mode, epochs=3, rounds=2, backend="local", progress=False, out=str(tmp_path)
    )
    result = medfed.federate(cfg, hospitals, described={"dataset": "synthetic"})
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert result.to_dict() == on_disk and set(result) == set(on_disk)
    assert result["accuracy"] == result.accuracy == on_disk["accuracy"]
    assert result.get("reference_accuracy") == result.reference_accuracy
    assert result.encryption_cost_pp == pytest.approx(
        100 * (result.reference_accuracy - result.accuracy)
    )
    assert (result.mode, result.key_setup, result.hospitals, result.n_classes) == (
        mode,
        "shared",
        3,
        2,
    )
    assert result.dataset == "synthetic" and result.excluded == ()
    assert result == dict(result) and pickle.loads(pickle.dumps(result)).mode == mode
    console = Console(record=True, width=160)
    medfed.print_summary(result, console)
    medfed.print_summary(on_disk, console)  # a loaded metrics.json prints the same table
    text = console.export_text()
    head = "encrypted training" if mode == "embeddings" else "federated head"
    assert text.count(f"accuracy ({head})") == 2
    # only mode "embeddings" has refresh rounds: its table states their security, once per print
    refreshes = mode == "embeddings"
    assert ("refresh_security_bits" in result) == refreshes
    assert text.count("refresh security (bits)") == (2 if refreshes else 0)


def test_run_result_is_read_only_and_json_ready():
    metrics = {"mode": "updates", "keys": "none", "hospitals": 2, "accuracy": float("nan")}
    result = RunResult.from_metrics({**metrics, "participants": [("a", "b")]})
    assert RunResult.from_metrics(result) is result
    assert result.accuracy != result.accuracy and result.to_dict()["accuracy"] is None
    assert result.to_dict()["participants"] == [["a", "b"]]
    with pytest.raises(TypeError):
        result["accuracy"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        result.mode = "embeddings"  # type: ignore[misc]


def test_provisioning_is_typed_and_writes_the_meta_json_it_always_did(tmp_path):
    meta = HospitalProvision(
        bucket=32,
        n_classes=3,
        ckks="fast",
        feature_scale=1.0,
        components=96,
        samples_per_component=64,
    )
    assert list(meta.to_dict()) == [
        "bucket",
        "n_classes",
        "ckks",
        "feature_scale",
        "components",
        "samples_per_component",
    ]
    updates = HospitalProvision(keys="none", n_classes=2, ckks="fast")
    assert list(updates.to_dict())[:2] == ["keys", "n_classes"]
    assert "bucket" not in updates.to_dict()
    hospital = synthetic_hospitals(n_hospitals=1, n=40, d=3)[0]
    provision(tmp_path, 0, hospital, None, meta)
    on_disk = json.loads((tmp_path / "hospital_0" / "meta.json").read_text())
    assert on_disk == {"name": hospital.name, **meta.to_dict()}
    assert load_provision(tmp_path, 0) == meta
    with pytest.raises(ValueError, match="unknown provisioning key"):
        HospitalProvision.from_dict({**meta.to_dict(), "bukket": 3})


def test_bytes_per_sample_divides_by_each_partys_own_samples():
    from medfed.fl.workspace import HospitalData
    from medfed.modes.common import bytes_per_sample

    x = np.zeros((10, 2))
    hospitals = [
        HospitalData("hospital-0", x[:4], np.zeros(4), x, np.zeros(10)),
        HospitalData("hospital-1", x, np.zeros(10), x, np.zeros(10)),
    ]
    parties = {
        "hospital-0": {"sent": 400, "received": 40},
        "hospital-1": {"sent": 1000, "received": 100},
        "aggregator": {"sent": 140, "received": 1400},
    }
    got = bytes_per_sample(parties, hospitals)
    assert got["hospital-0"] == {"sent": 100.0, "received": 10.0}
    assert got["hospital-1"] == {"sent": 100.0, "received": 10.0}
    assert got["aggregator"] == {"sent": 10.0, "received": 100.0}  # per all 14 samples
