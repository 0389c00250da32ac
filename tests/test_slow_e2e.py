"""The issue's acceptance runs, through the real CLI on Flower's Ray simulation engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
REPO = Path(__file__).resolve().parents[1]

#: ``python KILLER --out ...``: medfed.simulate, whose hospital-0 process kills itself with
#: $KILL_SIGNAL after its statistics work (the lead: Galois keys, its memory peak), as the
#: kernel's or Ray's OOM killer would; on every try, or only once with $KILL_ONCE (a marker
#: file). Run as a script, so that Ray pickles the mod by value.
KILLER = """
import os, signal, sys

def kill_lead(msg, context, call_next):
    from medfed.fl import messages as M
    from medfed.fl.faults import _stage_of

    if M.node_index(context) != 0 or _stage_of(msg) != "stats":
        return call_next(msg, context)
    once = os.environ.get("KILL_ONCE")
    if once and os.path.exists(once):
        return call_next(msg, context)
    call_next(msg, context)
    if once:
        open(once, "w").close()
    os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))

import medfed.fl.launch as launch
faults = launch.fault_mods
launch.fault_mods = lambda *a, **k: [kill_lead, *faults(*a, **k)]
from medfed.simulate import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def _simulate(out: Path, cache: Path, *args: str, script: Path | None = None, **env) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1", **env}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [
            sys.executable,
            *([str(script)] if script else ["-m", "medfed.simulate"]),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--no-progress",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "accuracy (encrypted training)" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    m["console"] = r.stdout + r.stderr
    return m


def _check(m: dict, hospitals: int, max_cost_pp: float) -> None:
    assert m["mode"] == "embeddings" and m["keys"] == "shared" and m["hospitals"] == hospitals
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.01
    # the head learned: above the majority rate, near the tuned plaintext model (issue 18's
    # bounds: 1.5 pp is two BreastMNIST test images, 1.0 pp four RetinaMNIST ones)
    assert m["accuracy"] > m["majority_accuracy"]
    assert m["encryption_cost_pp"] <= max_cost_pp
    assert m["wall_seconds"] < 600
    assert m["bytes_up"] > 0 and m["bytes_down"] > 0
    assert m["excluded"] == []


def test_default_run_five_hospitals(tmp_path, cache_dir):
    m = _simulate(tmp_path, cache_dir, "--hospitals", "5")
    _check(m, 5, 1.5)
    assert m["dataset"] == "breastmnist" and m["test_samples_evaluated"] == 156


@pytest.mark.skipif(not (SHARED / "retinamnist.npz").exists(), reason="needs ../shared data")
def test_retinamnist_rgb_five_classes(tmp_path, cache_dir):
    m = _simulate(tmp_path, cache_dir, "--dataset", str(SHARED / "retinamnist.npz"))
    _check(m, 5, 1.0)
    assert m["n_classes"] == 5 and m["test_samples_evaluated"] == 400


def test_ten_hospitals_dirichlet(tmp_path, cache_dir):
    m = _simulate(
        tmp_path, cache_dir, "--hospitals", "10", "--split", "dirichlet", "--alpha", "0.5"
    )
    _check(m, 10, 1.5)


@pytest.fixture
def killer(tmp_path) -> Path:
    path = tmp_path / "kill_lead.py"
    path.write_text(KILLER)
    return path


def _no_traceback_on_console(m: dict) -> Path:
    """Asserts a clean console; returns the reports file its one line names."""
    console = m["console"]
    assert "Traceback" not in console and "SIGSEGV received" not in console, console[-3000:]
    assert "PC: @" not in console and "(raylet)" not in console
    assert console.count("a hospital's Ray process failed;") == 1  # where the reports are
    where = console.split("reports are in", 1)[1].split(", and each", 1)[0]
    reports = Path("".join(where.split()))  # the console wraps long lines
    assert "A worker died" in reports.read_text()
    return reports


def test_the_lead_hospitals_process_dies_in_the_key_round(tmp_path, cache_dir, killer):
    """Issue 20: the lead's Ray actor dies (SIGSEGV: a native crash) after its stats work, on
    the retry too. The next hospital sends the public context, the others are unaffected, and
    the crash report stays in Ray's logs."""
    m = _simulate(
        tmp_path,
        cache_dir,
        "--hospitals",
        "5",
        "--epochs",
        "2",
        script=killer,
        KILL_SIGNAL="SIGSEGV",
    )
    assert m["hospitals"] == 5 and m["contributors"]["stats"] == [
        f"hospital-{i}" for i in (1, 2, 3, 4)
    ]
    ((stage, reason),) = [(e["stage"], e["reason"]) for e in m["excluded"]]
    assert stage == "stats" and reason.startswith("the hospital's process died mid-round")
    assert abs(m["accuracy"] - m["plaintext_accuracy"]) <= 0.01
    logs = _no_traceback_on_console(m).parent  # Ray's session logs: the native backtrace
    assert any("SIGSEGV received" in f.read_text() for f in logs.glob("worker-*.err"))


def test_a_process_killed_once_is_restarted_and_its_round_retried(tmp_path, cache_dir, killer):
    """What failed the default run under load: one hospital process killed (SIGKILL, as by the
    kernel's or Ray's OOM killer). Ray restarts the actor and retries the message: nothing is
    excluded, and only the one line on the console says a process failed."""
    once = str(tmp_path / "killed")
    m = _simulate(
        tmp_path,
        cache_dir,
        "--hospitals",
        "5",
        script=killer,
        KILL_SIGNAL="SIGKILL",
        KILL_ONCE=once,
    )
    assert (tmp_path / "killed").exists()
    _check(m, 5, 1.5)
    _no_traceback_on_console(m)
