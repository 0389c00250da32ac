"""simulations/export_features.py: the untrained-backbone message is shown once."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from medfed.embed import UntrainedBackboneWarning
from medfed.embed.backbones import _warn_untrained

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "export_features.py"


def _script():
    spec = importlib.util.spec_from_file_location("export_features", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_prepare(cfg):
    """What prepare() does with a random-init backbone: warns from several call sites."""
    _warn_untrained("test_export_backbone", 0)  # building the backbone
    _warn_untrained("test_export_backbone", 0)  # embedding the next split
    split = {"train": (None, np.array([0, 1, 1])), "test": (None, np.array([1, 0]))}
    return SimpleNamespace(
        dataset=SimpleNamespace(name="fake", n_classes=2, split=split.__getitem__),
        train_features=np.zeros((3, 4)),
        test_features=np.zeros((2, 4)),
        backbone=SimpleNamespace(name="test_export_backbone", weights=None, pretrained=False),
    )


def test_untrained_backbone_is_reported_once(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr("medfed.experiments.prepare.prepare", _fake_prepare)
    caplog.set_level(logging.WARNING, logger="medfed")
    out = tmp_path / "f.npz"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _script().main(["--out", str(out), "--no-progress"]) == 0
    assert not [w for w in caught if issubclass(w.category, UntrainedBackboneWarning)]
    logged = [r for r in caplog.records if "BACKBONE IS UNTRAINED" in r.getMessage()]
    assert len(logged) == 1
    assert "UNTRAINED: random weights" in capsys.readouterr().out
    assert np.load(out)["train_labels"].tolist() == [0, 1, 1]
