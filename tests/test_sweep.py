"""Sweeps: grid expansion, cell ids, validation, resumability, failures, outputs, Ray tasks.

Cells run through a cheap fake runner (a module-level function, so Ray and a child process can
import it); one test runs them as real Ray tasks on a 2-CPU local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medfed.config import SimulationConfig
from medfed.experiments.sweep import (
    RayExecutor,
    SerialExecutor,
    SweepError,
    SweepSpec,
    cell_id,
    load_record,
    record_path,
    run_sweep,
)
from medfed.experiments.yardsticks import YARDSTICK_KEYS
from medfed.scale.cluster import ClusterError, resolve_address
from medfed.sweep import main as sweep_main

HERE = Path(__file__).resolve().parent

SPEC = {
    "name": "t",
    "base": {"epochs": 2, "backend": "local", "dataset": "breastmnist"},
    "grid": {"hospitals": [2, 3], "ckks": ["standard", "fast"], "sigmoid_degree": [1, 3]},
    "exclude": [{"ckks": "standard", "sigmoid_degree": 3}],
}


def fake_runner(cfg: SimulationConfig) -> dict:
    """Deterministic metrics shaped like medfed.runner.run's, plus a rounds.jsonl."""
    gap = -0.5 * (cfg.sigmoid_degree == 1) - 0.1 * (cfg.ckks == "standard") - 0.01 * cfg.seed
    metrics = {
        "mode": cfg.mode,
        "keys": cfg.keys,
        "hospitals": cfg.hospitals,
        "backbone_pretrained": True,
        "ckks": {"name": cfg.ckks, "coeff_mod_bit_sizes": [49, 30, 49]},
        "accuracy": 0.8 + gap / 100,
        "auc": 0.85,
        "reference_accuracy": 0.83,
        "reference_auc": 0.9,
        "reference_C": 0.1,
        "majority_accuracy": 0.7,
        "encryption_cost_pp": 100 * (0.83 - (0.8 + gap / 100)),
        "plaintext_accuracy": 0.8,
        "plaintext_auc": 0.85,
        "accuracy_gap_pp": gap,
        "approximation_gap_pp": gap,
        "wall_seconds": 1.0 + cfg.hospitals,
        "federation_seconds": 0.5 + cfg.hospitals,
        "bytes_up": 2**20 * 10 * cfg.hospitals,
        "bytes_down": 2**20 * 5 * cfg.hospitals,
        "bytes_per_party": {f"hospital-{i}": {"sent": 1} for i in range(cfg.hospitals)},
    }
    if cfg.out:
        Path(cfg.out, "rounds.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    return metrics


def failing_runner(cfg: SimulationConfig) -> dict:
    if cfg.hospitals == 3:
        raise ValueError(f"simulated failure with {cfg.hospitals} hospitals")
    return fake_runner(cfg)


def pid_runner(cfg: SimulationConfig) -> dict:
    return {**fake_runner(cfg), "pid": os.getpid()}


def crashing_runner(cfg: SimulationConfig) -> dict:
    if cfg.hospitals == 3:
        os._exit(3)  # a segfault-like death: no exception, no record from the runner
    return pid_runner(cfg)


class CountingRunner:
    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls: list[SimulationConfig] = []
        self.interrupt_at = interrupt_at

    def __call__(self, cfg: SimulationConfig) -> dict:
        self.calls.append(cfg)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return fake_runner(cfg)


def _run(spec, out, runner, **kw):
    return run_sweep(spec, out, runner=runner, executor=SerialExecutor(), progress=False, **kw)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- grid


def test_grid_expands_in_file_order_with_exclusions_and_validated_configs():
    cells = SweepSpec.from_dict(SPEC).cells()
    got = [(c.knobs["hospitals"], c.knobs["ckks"], c.knobs["sigmoid_degree"]) for c in cells]
    assert got == [
        (2, "standard", 1),
        (2, "fast", 1),
        (2, "fast", 3),
        (3, "standard", 1),
        (3, "fast", 1),
        (3, "fast", 3),
    ]
    c = cells[2]
    assert isinstance(c.config, SimulationConfig)
    assert (c.config.epochs, c.config.backend, c.config.hospitals) == (2, "local", 2)
    assert c.config.out is None and c.config.progress is False


def test_grid_overrides_base_and_duplicate_cells_collapse():
    spec = SweepSpec.from_dict({"base": {"seed": 7}, "grid": {"seed": [1, 1, 2], "lr": [2, 2.0]}})
    cells = spec.cells()
    assert [c.config.seed for c in cells] == [1, 2]
    assert len({c.cell_id for c in cells}) == 2


def test_no_grid_is_one_cell_of_the_base():
    cells = SweepSpec.from_dict({"base": {"hospitals": 4}}).cells()
    assert len(cells) == 1 and cells[0].config.hospitals == 4 and cells[0].knobs == {}


def test_cell_id_is_stable_and_ignores_out_progress_key_order_and_int_float():
    a = SimulationConfig(hospitals=3, lr=2, alpha=1)
    b = SimulationConfig.from_dict({"alpha": 1.0, "lr": 2.0, "hospitals": 3})
    c = a.replace(out="/somewhere", progress=False)
    assert cell_id(a) == cell_id(b) == cell_id(c)
    assert len(cell_id(a)) == 12 and int(cell_id(a), 16) >= 0
    assert cell_id(a.replace(seed=1)) != cell_id(a)
    # stable across processes and runs: a pinned value for a pinned config
    code = (
        "from medfed.config import SimulationConfig as S; "
        "from medfed.experiments.sweep import cell_id; print(cell_id(S(hospitals=3)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == cell_id(SimulationConfig(hospitals=3))


@pytest.mark.parametrize(
    "data, match",
    [
        ({"grid": {"hospitals": [2]}, "paralel": 2}, r"'paralel' \(did you mean 'parallel'\?\)"),
        ({"hospitals": 3}, r"unknown key.*'hospitals'.*under 'base:'"),
        ({"grid": {"epoch": [1, 2]}}, r"grid: unknown key.*'epoch'.*did you mean 'epochs'"),
        ({"grid": {"nope": [1]}}, r"valid keys: hospitals, mode, keys"),
        ({"base": {"ckks_preset": "fast"}}, r"base: unknown key.*'ckks_preset'"),
        ({"grid": {"hospitals": 3}}, r"grid.hospitals must be a non-empty list"),
        ({"grid": {"hospitals": []}}, r"grid.hospitals must be a non-empty list"),
        ({"base": {"out": "x"}}, r"'out' is set by the sweep itself \(use --out DIR"),
        ({"exclude": {"ckks": "fast"}}, r"exclude must be a list"),
        ({"exclude": [{"ckk": "fast"}]}, r"exclude\[0\]: unknown key"),
        ({"max_concurrency": 0}, r"max_concurrency must be an integer >= 1"),
        ({"cpus_per_cell": -1}, r"cpus_per_cell must be a positive number"),
        ({"isolate": "sometimes"}, r"isolate must be auto, always or never"),
    ],
)
def test_spec_errors_name_the_key(data, match):
    with pytest.raises(SweepError, match=match):
        SweepSpec.from_dict(data, source="s.yaml").cells()


def test_every_cell_is_validated_before_anything_runs(tmp_path):
    runner = CountingRunner()
    bad_value = SweepSpec.from_dict({"grid": {"hospitals": [2, 0], "split": ["iid", "zipf"]}})
    with pytest.raises(SweepError, match=r"3 invalid cell\(s\)") as e:
        _run(bad_value, tmp_path, runner)
    assert "cell hospitals=0 split=iid" in str(e.value) and "'zipf'" in str(e.value)
    too_deep = SweepSpec.from_dict({"grid": {"ckks": ["fast"], "sigmoid_degree": [1, 5]}})
    with pytest.raises(SweepError, match=r"cell ckks=fast sigmoid_degree=5: .*\n.*exclude"):
        _run(too_deep, tmp_path, runner)
    no_preset = SweepSpec.from_dict({"grid": {"ckks": ["fast", "fastest"]}})
    with pytest.raises(SweepError, match=r"unknown CKKS preset 'fastest'"):
        _run(no_preset, tmp_path, runner)
    assert runner.calls == [] and not (tmp_path / "cells").exists()


def test_shipped_sweeps_expand_and_the_smoke_one_is_small():
    configs = HERE.parent / "configs"
    smoke = [p for p in configs.glob("sweep*.yaml") if "smoke" in p.name]
    assert smoke, "configs/ must ship a smoke sweep"
    for path in configs.glob("sweep*.yaml"):
        cells = SweepSpec.from_yaml(path).cells()
        assert cells, path
    for path in smoke:
        small = SweepSpec.from_yaml(path).cells()
        assert len(small) <= 9 and all(c.config.backend == "local" for c in small)
        assert all(c.config.epochs <= 3 or c.config.mode == "updates" for c in small)
        assert all(c.config.rounds <= 5 for c in small if c.config.mode == "updates")
    privacy = [p for p in smoke if "privacy" in p.name]
    assert privacy, "configs/ must ship a smoke privacy sweep"
    assert {"dp_epsilon", "keys", "mode"} <= set(SweepSpec.from_yaml(privacy[0]).varying)
    paper = SweepSpec.from_yaml(configs / "sweep_privacy_accuracy.yaml")
    assert {"ckks", "sigmoid_degree", "hospitals", "alpha", "seed"} <= set(paper.varying)


# ----------------------------------------------------------------------------- running


def test_sweep_writes_records_table_plots_report_and_rerun_skips_everything(tmp_path):
    spec = SweepSpec.from_dict(SPEC)
    runner = CountingRunner()
    outcome = _run(spec, tmp_path, runner)
    assert len(runner.calls) == 6 and all(c.progress is False for c in runner.calls)
    assert outcome.failed == [] and outcome.missing == [] and len(outcome.ran) == 6
    for c in outcome.cells:
        record = load_record(tmp_path, c.cell_id)
        assert record["status"] == "done" and record["knobs"] == c.knobs
        run_dir = tmp_path / "runs" / c.cell_id
        assert (
            json.loads((run_dir / "metrics.json").read_text())["hospitals"] == c.knobs["hospitals"]
        )
        assert (run_dir / "rounds.jsonl").read_text() == '{"round": 1}\n'
    lines = (tmp_path / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 7
    for col in ("cell_id", "status", "hospitals", "ckks", "sigmoid_degree", "epochs", "seed"):
        assert col in header  # every knob ...
    for col in ("accuracy", "accuracy_gap_pp", "bytes_up", "ckks.name", "seconds", "error"):
        assert col in header  # ... and every metric
    for col in YARDSTICK_KEYS:
        assert col in header  # the yardsticks, in every row
    assert "exact_accuracy" not in header
    assert header[-2:] == ["seconds", "error"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6
    for name in (
        "accuracy_vs_ckks",
        "accuracy_vs_sigmoid_degree",
        "time_vs_hospitals",
        "bytes_vs_hospitals",
    ):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots" / "accuracy_vs_alpha.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "done 6, failed 0, not run 0" in report
    title = "Accuracy and encryption cost vs CKKS parameters"
    assert f"![{title}](plots/accuracy_vs_ckks.png)" in report
    assert "accuracy_vs_alpha (the grid does not vary alpha" in report
    assert "| hospitals | ckks | sigmoid_degree |" in report
    assert "reference acc. | majority acc. | enc. cost (pp) |" in report
    assert "- enc. cost (pp): reference acc. - accuracy" in report

    before = _snapshot(tmp_path)
    again = CountingRunner()
    t0 = time.perf_counter()
    outcome = _run(spec, tmp_path, again)
    assert again.calls == [] and outcome.ran == [] and len(outcome.skipped) == 6
    assert time.perf_counter() - t0 < 10
    assert _snapshot(tmp_path) == before  # identical results, byte for byte


def privacy_runner(cfg: SimulationConfig) -> dict:
    """fake_runner with the privacy columns: more noise, less accuracy and a weaker attack."""
    eps = cfg.dp_epsilon
    loss = 0.0 if eps is None else 0.05 / eps
    return {
        **fake_runner(cfg),
        "accuracy": 0.8 - loss,
        "epsilon": eps,
        "mia_auc": 0.7 if eps is None else 0.5 + 0.02 * eps,
        "mia_tpr_at_1fpr": 0.05 if eps is None else 0.01,
    }


def test_a_privacy_sweep_carries_epsilon_and_the_attack_into_table_plots_and_report(tmp_path):
    spec = SweepSpec.from_dict(
        {
            "name": "p",
            "base": {"mode": "updates", "backend": "local", "rounds": 2},
            "grid": {"keys": ["none", "shared"], "dp_epsilon": [None, 8.0, 1.0]},
        }
    )
    outcome = _run(spec, tmp_path, privacy_runner)
    assert outcome.failed == [] and len(outcome.ran) == 6
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"epsilon", "mia_auc", "mia_tpr_at_1fpr", "dp_epsilon"} <= set(header)
    for name in ("accuracy_vs_epsilon", "accuracy_and_cost_vs_keys"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "## Privacy / accuracy trade-off" in report
    assert "- mode updates, keys none: without DP accuracy 0.800, attack AUC 0.700" in report
    assert "at epsilon 1.00 accuracy 0.750, attack AUC 0.520" in report
    assert "costs +5.0 pp of accuracy" in report
    assert "| epsilon | attack AUC | attack TPR@1%FPR |" in report


def test_interrupted_sweep_keeps_finished_cells_and_resumes_only_the_missing(tmp_path):
    spec = SweepSpec.from_dict(SPEC)
    runner = CountingRunner(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _run(spec, tmp_path, runner)
    done = sorted(p.stem for p in (tmp_path / "cells").glob("*.json"))
    assert len(done) == 2
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3  # rebuilt, partial
    assert "not run 4" in (tmp_path / "report.md").read_text()
    # a record cut short (a kill between open and rename cannot do this, a full disk can)
    cells = spec.cells()
    truncated = cells[0].cell_id
    assert truncated in done
    path = record_path(tmp_path, truncated)
    path.write_text(path.read_text()[:50])
    assert load_record(tmp_path, truncated) is None

    rerun = CountingRunner()
    outcome = _run(spec, tmp_path, rerun)
    rerun_ids = {cell_id(c) for c in rerun.calls}
    assert rerun_ids == {c.cell_id for c in cells} - set(done) | {truncated}
    assert len(outcome.skipped) == 1 and outcome.missing == [] and outcome.failed == []


def test_killed_sweep_process_loses_nothing_that_finished(tmp_path):
    """SIGKILL the sweep while its third cell runs; a rerun runs only the missing cells."""
    out = tmp_path / "out"
    marker = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        import test_sweep as t
        from medfed.experiments.sweep import SerialExecutor, SweepSpec, run_sweep
        calls = []
        def runner(cfg):
            calls.append(cfg)
            if len(calls) == 3:
                open({str(marker)!r}, "w").close()
                time.sleep(600)
            return t.fake_runner(cfg)
        run_sweep(SweepSpec.from_dict(t.SPEC), {str(out)!r}, runner=runner,
                  executor=SerialExecutor(), progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the sweep process ended early"
            assert time.monotonic() < deadline, "the third cell never started"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    finished = {p.stem for p in (out / "cells").glob("*.json")}
    assert len(finished) == 2
    assert not [p for p in (out / "cells").iterdir() if p.name.startswith(".")]
    rerun = CountingRunner()
    _run(SweepSpec.from_dict(SPEC), out, rerun)
    assert len(rerun.calls) == 4 and not {cell_id(c) for c in rerun.calls} & finished


def test_failed_cells_are_recorded_with_their_error_never_dropped(tmp_path):
    spec = SweepSpec.from_dict(SPEC)
    outcome = _run(spec, tmp_path, failing_runner)
    failed = [c for c in outcome.cells if c.knobs["hospitals"] == 3]
    assert sorted(outcome.failed) == sorted(c.cell_id for c in failed)
    for c in failed:
        record = load_record(tmp_path, c.cell_id)
        assert record["status"] == "failed" and record["metrics"] is None
        assert record["error"] == "ValueError: simulated failure with 3 hospitals"
        assert "Traceback" in record["traceback"]
        assert not (tmp_path / "runs" / c.cell_id).exists()
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 7
    assert sum("ValueError: simulated failure with 3 hospitals" in r for r in rows) == 3
    report = (tmp_path / "report.md").read_text()
    assert "done 3, failed 3" in report and "## Failed cells" in report
    assert "ValueError: simulated failure with 3 hospitals" in report
    assert "plots/time_vs_hospitals.png" not in report  # one hospital count left: skipped

    kept = CountingRunner()
    _run(spec, tmp_path, kept, retry_failed=False)
    assert kept.calls == []
    retried = CountingRunner()
    outcome = _run(spec, tmp_path, retried)
    assert sorted(cell_id(c) for c in retried.calls) == sorted(c.cell_id for c in failed)
    assert outcome.failed == []


def test_plots_are_skipped_gracefully_when_the_grid_varies_none_of_their_knobs(tmp_path):
    spec = SweepSpec.from_dict({"grid": {"seed": [0, 1, 2]}})
    outcome = _run(spec, tmp_path, fake_runner)
    assert [p.path for p in outcome.plots] == [None] * len(outcome.plots)
    assert not list(tmp_path.glob("plots/*.png"))
    report = (tmp_path / "report.md").read_text()
    assert "No plot" in report and "Mean ± sd over seed." in report
    assert "-0.01 ± 0.01" in report  # seeds averaged in the key-metrics table


def test_seeds_are_averaged_in_report_and_plots(tmp_path):
    spec = SweepSpec.from_dict({"grid": {"ckks": ["fast", "standard"], "seed": [0, 1]}})
    outcome = _run(spec, tmp_path, fake_runner)
    report = (tmp_path / "report.md").read_text()
    assert "Mean ± sd over seed." in report and "| ckks | cells |" in report
    assert {p.name for p in outcome.plots if p.path} == {"accuracy_vs_ckks"}


# ----------------------------------------------------------------------------- Ray, CLI


def test_cells_run_as_real_ray_tasks(tmp_path, monkeypatch):
    # Ray workers import the runner by reference: let them find this test module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    spec = SweepSpec.from_dict({"base": {"backend": "local"}, "grid": {"hospitals": [2, 3, 4]}})
    executor = RayExecutor(max_concurrency=2, num_cpus=2)
    outcome = run_sweep(spec, tmp_path, runner=pid_runner, executor=executor, progress=False)
    assert outcome.failed == [] and len(outcome.ran) == 3
    pids = {load_record(tmp_path, c)["metrics"]["pid"] for c in outcome.ran}
    assert os.getpid() not in pids
    import ray

    assert not ray.is_initialized()  # the executor shut down the Ray it started


def test_isolated_cells_run_in_a_child_process_and_a_crash_is_recorded(tmp_path):
    spec = SweepSpec.from_dict({"grid": {"hospitals": [2, 3]}, "isolate": "always"})
    outcome = _run(spec, tmp_path, crashing_runner)
    ok, crashed = outcome.cells
    record = load_record(tmp_path, ok.cell_id)
    assert record["status"] == "done" and record["metrics"]["pid"] != os.getpid()
    assert (tmp_path / "runs" / ok.cell_id / "rounds.jsonl").is_file()
    assert outcome.failed == [crashed.cell_id]
    assert "BrokenProcessPool" in load_record(tmp_path, crashed.cell_id)["error"]


def test_resolve_address_prefers_flag_then_env_and_rejects_dashboard_urls():
    assert resolve_address(None, {}) is None
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert resolve_address("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"
    with pytest.raises(ClusterError, match="ray job submit --address http://h:8265"):
        resolve_address(None, {"RAY_ADDRESS": "http://h:8265"})


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  hospitalz: [2, 3]\n")
    assert sweep_main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "hospitalz" in err and "did you mean 'hospitals'" in err and "Traceback" not in err
    assert sweep_main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    ok = tmp_path / "ok.yaml"
    ok.write_text("grid:\n  hospitals: [2, 3]\n")
    os.environ["RAY_ADDRESS"] = "http://127.0.0.1:8265"
    try:
        assert sweep_main([str(ok), "--out", str(tmp_path / "o")]) == 2
    finally:
        del os.environ["RAY_ADDRESS"]
    assert "dashboard / Jobs API address" in capsys.readouterr().err
    r = subprocess.run(
        [sys.executable, "-m", "medfed.sweep", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "hospitalz" in r.stderr


def test_cli_dry_run_lists_cells_and_their_state(tmp_path, capsys):
    spec = SweepSpec.from_dict(SPEC)
    _run(spec, tmp_path, fake_runner)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(SPEC))  # JSON is YAML
    assert sweep_main([str(path), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 cells" in out and out.count("│ done") == 6
