"""Result files are written atomically: a run killed mid-write leaves the previous file or
none, never a partial one a rerun would trust."""

import json
import os

import numpy as np
import pytest

from medfed.experiments.results import atomic_write_text, write_run


def test_a_write_killed_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"accuracy": 0.5}\n')

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"accuracy": 0.9, "excluded": []}\n')
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left


def test_a_write_failing_halfway_leaves_no_partial_file(tmp_path, monkeypatch):
    import io

    real_fdopen = os.fdopen

    class HalfWriter(io.TextIOWrapper):
        def write(self, text):
            super().write(text[: len(text) // 2])
            self.flush()
            raise OSError("disk full")

    def fdopen(fd, mode="r", *args, **kwargs):
        return HalfWriter(real_fdopen(fd, mode.replace("w", "wb")), encoding="utf-8")

    path = tmp_path / "out" / "rounds.jsonl"
    atomic_write_text(path, "old\n")
    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new line\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert [p.name for p in path.parent.iterdir()] == ["rounds.jsonl"]


def test_a_run_killed_mid_write_leaves_no_file_a_rerun_would_trust(tmp_path, monkeypatch):
    """write_run writes metrics.json last; a kill before it leaves no metrics.json at all."""
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(os.path.basename(dst))
        if os.path.basename(dst) == "metrics.json":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_run(tmp_path, {"hospitals": 3}, {"accuracy": float("nan")}, [{"stage": "stats"}])
    assert calls == ["config.yaml", "rounds.jsonl", "metrics.json"]
    assert not (tmp_path / "metrics.json").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_sweep_records_are_written_atomically_and_partial_ones_are_not_trusted(tmp_path):
    from medfed.experiments.sweep import load_record, record_path, store_record

    record = {
        "version": 1,
        "cell_id": "abc123def456",
        "status": "done",
        "config": {"hospitals": 3},
        "metrics": {"accuracy": 0.9},
    }
    store_record(tmp_path, dict(record))
    assert load_record(tmp_path, "abc123def456")["metrics"] == {"accuracy": 0.9}
    path = record_path(tmp_path, "abc123def456")
    full = path.read_text()
    for cut in (1, len(full) // 3, len(full) - 2):  # what a non-atomic writer could leave
        path.write_text(full[:cut])
        assert load_record(tmp_path, "abc123def456") is None
    assert np.isfinite(json.loads(full)["metrics"]["accuracy"])
