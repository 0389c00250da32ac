"""The command line: clear errors without tracebacks, and a tiny end-to-end run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from medfed.simulate import config_from_args, main


def _run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "medfed.simulate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_broken_npz_exits_nonzero_naming_the_file_without_traceback(tmp_path):
    broken = tmp_path / "BROKEN.npz"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    r = _run_cli("--hospitals", "3", "--dataset", str(broken))
    assert r.returncode == 2
    assert "BROKEN.npz" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_unknown_config_key_is_named_with_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hospitals: 3\nepoch: 3\n")
    with pytest.raises(Exception, match="did you mean 'epochs'"):
        config_from_args(["--config", str(cfg)])
    assert main(["--config", str(cfg)]) == 2


def test_flags_override_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hospitals: 3\nepochs: 7\n")
    c, _ = config_from_args(["--config", str(cfg), "--epochs", "2", "--split", "dirichlet"])
    assert (c.hospitals, c.epochs, c.split) == (3, 2, "dirichlet")


def test_shipped_default_config_matches_builtin_defaults():
    from pathlib import Path

    from medfed.config import SimulationConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert SimulationConfig.from_yaml(path) == SimulationConfig()


def test_tiny_end_to_end_run_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, (n, 1)).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] += 150  # a bright square marks class 1
        return x, y

    arrays = {}
    for name, n in (("train", 90), ("val", 10), ("test", 40)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    data = tmp_path / "toy.npz"
    np.savez(data, **arrays)
    out = tmp_path / "run"
    code = main(
        [
            "--hospitals",
            "2",
            "--dataset",
            str(data),
            "--img-size",
            "32",
            "--epochs",
            "3",
            "--backend",
            "local",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["hospitals"] == 2 and m["backbone_pretrained"] is False
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.025  # 40 test images: 1 flip max
    assert "UNTRAINED" in capsys.readouterr().out
    # second run hits the feature cache
    assert (
        main(
            [
                *["--hospitals", "2", "--dataset", str(data), "--img-size", "32"],
                *["--epochs", "1", "--backend", "local", "--out", str(out)],
                *["--cache-dir", str(tmp_path / "cache"), "--no-progress"],
            ]
        )
        == 0
    )
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["embedding_cache_hits"] == {"train": True, "test": True}


@pytest.mark.parametrize(
    "args,named",
    [
        (["--inject", "explode:hospital=1,round=upload"], "unknown fault kind 'explode'"),
        (["--inject", "crash:hospital=7,round=upload"], "no hospital 7"),
        (["--inject", "crash:hospital=1,round=sum-99", "--epochs", "5"], "sum-0 .. sum-4"),
        (["--inject", "slow:hospital=1"], "slow needs seconds"),
        (["--ckks", "fats"], "Did you mean 'fast'"),
        (["--split", "random"], "split='random' is not one of iid, dirichlet"),
        (["--hospitals", "0"], "hospitals must be an integer >= 1"),
        (["--dataset", "retinamnist", "--data-root", "/nonexistent"], "retinamnist"),
        (["--dataset", "/nonexistent/BROKEN.npz"], "BROKEN.npz: dataset file does not exist"),
    ],
)
def test_user_errors_exit_2_with_the_message_not_a_traceback(args, named, capsys):
    assert main(["--hospitals", "3", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfed: error: ") and named in err
    assert "Traceback" not in err


def test_bad_inject_spec_from_the_shell_has_no_traceback():
    r = _run_cli("--hospitals", "3", "--inject", "crash:hospital=1,round=uplaod")
    assert r.returncode == 2
    assert "did you mean 'upload'" in r.stderr and "rounds are stats" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def _toy_npz(path, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, n in (("train", 120), ("val", 10), ("test", 60)):
        y = rng.integers(0, 2, (n, 1)).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] += 150
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = x, y
    np.savez(path, **arrays)
    return path


def test_injected_faults_run_to_the_end_and_list_the_exclusions(tmp_path, capsys):
    data = _toy_npz(tmp_path / "toy.npz")
    common = [
        *["--dataset", str(data), "--img-size", "32", "--epochs", "3", "--backend", "local"],
        *["--cache-dir", str(tmp_path / "cache"), "--no-progress"],
    ]
    out = tmp_path / "faults"
    code = main(
        [
            *["--hospitals", "4", *common, "--out", str(out)],
            *["--inject", "crash:hospital=1,round=upload"],
            *["--inject", "corrupt:hospital=2,round=sum"],
            *["--inject", "slow:hospital=3,seconds=0.1,round=final"],
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "excluded contributions" in printed and "crashed mid-round at upload" in printed
    m = json.loads((out / "metrics.json").read_text())
    stages = {(e["stage"], e["hospital"]) for e in m["excluded"]}
    assert ("upload", "hospital-1") in stages and ("final", "hospital-1") in stages
    assert any(s.startswith("sum-") and h == "hospital-2" for s, h in stages)
    assert m["contributors"]["upload"] == ["hospital-0", "hospital-2", "hospital-3"]
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 1 / 30  # one test image at most
    # too few hospitals left: exit 1 with the reason, no traceback, no metrics written
    out2 = tmp_path / "stopped"
    code = main(
        [
            *["--hospitals", "2", *common, "--out", str(out2)],
            *["--inject", "dropout:hospital=1,round=stats"],
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "medfed: error: only 1 hospital(s) contributed usable stats data" in err
    assert "Traceback" not in err
    assert not (out2 / "metrics.json").exists()
