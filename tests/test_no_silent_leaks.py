"""Issue 20, "No silent leaks": a bucket below 32 needs an explicit opt-in and is recorded; a
hospital's failure replies are identical whatever failed; no error advises an unsafe load."""

from __future__ import annotations

import io
import json
import os
import secrets
import warnings

import numpy as np
import pytest
from rich.console import Console

from medfed.config import MIN_BUCKET, ConfigError, SimulationConfig
from medfed.crypto.diagonal import plan_diagonal
from medfed.errors import MedfedError, format_user_error, without_unsafe_advice
from medfed.experiments.results import run_table, summary_table
from medfed.fl import messages as M
from medfed.fl.hospital import make_hospital_app
from medfed.fl.local_grid import LocalGrid
from medfed.fl.workspace import DATA, ERRORS, hospital_dir
from medfed.simulate import config_from_args, main
from tests.conftest import synthetic_hospitals
from tests.fl_helpers import PARAMS, provision_all

UNSAFE = ("weights_only", "allow_pickle", "trust_remote_code", "pickle.load")

# ------------------------------------------------------------------ 1. small buckets: opt-in


@pytest.mark.parametrize("bucket", [1, 16, MIN_BUCKET - 1])
def test_a_bucket_below_32_is_refused_naming_the_flag_and_the_leak(bucket):
    with pytest.raises(ConfigError) as info:
        SimulationConfig(bucket=bucket)
    text = str(info.value)
    assert "--allow-small-bucket" in text and "sample count" in text
    assert ("exactly" in text) == (bucket == 1)
    cfg = SimulationConfig(bucket=bucket, allow_small_bucket=True)
    assert cfg.bucket == bucket and cfg.to_dict()["allow_small_bucket"] is True


def test_the_opt_in_comes_from_the_command_line_and_yaml(tmp_path, capsys):
    assert main(["--bucket", "1", "--hospitals", "2"]) == 2
    assert "--allow-small-bucket" in capsys.readouterr().err
    cfg, _ = config_from_args(["--bucket", "1", "--allow-small-bucket"])
    assert (cfg.bucket, cfg.allow_small_bucket) == (1, True)
    path = tmp_path / "c.yaml"
    path.write_text("bucket: 8\nallow_small_bucket: true\n")
    assert SimulationConfig.from_yaml(path).allow_small_bucket is True
    with pytest.raises(ConfigError, match="allow_small_bucket must be true or false"):
        SimulationConfig(allow_small_bucket="yes")
    assert SimulationConfig(bucket=64).allow_small_bucket is False  # 32 and up: no opt-in


def _metrics(**extra) -> dict:
    return {
        "mode": "embeddings",
        "keys": "shared",
        "hospitals": 2,
        "ckks": {"name": "fast"},
        "bytes_per_party": {},
        **extra,
    }


def _text(table) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


def test_the_summary_warns_when_a_small_bucket_was_opted_into():
    opted = _text(summary_table(_metrics(bucket=1, allow_small_bucket=True)))
    assert "WARNING: bucket below 32 (--allow-small-bucket)" in opted
    assert "sample counts revealed exactly" in opted
    assert "to within 8" in _text(run_table(_metrics(bucket=8, allow_small_bucket=True)))
    for quiet in (_metrics(bucket=32, allow_small_bucket=False), _metrics()):
        assert "WARNING" not in _text(summary_table(quiet))
    assert "WARNING" not in _text(summary_table(_metrics(bucket=64, allow_small_bucket=True)))


def test_an_opted_in_small_bucket_is_recorded_in_metrics_json(tmp_path):
    from medfed.runner import federate

    hospitals = synthetic_hospitals(n_hospitals=2, n=90, d=8)
    out = tmp_path / "run"
    cfg = SimulationConfig(
        hospitals=2,
        backend="local",
        epochs=1,
        components=0,
        progress=False,
        bucket=1,
        allow_small_bucket=True,
        out=str(out),
    )
    federate(cfg, hospitals, 2, {"dataset": "synthetic"})
    m = json.loads((out / "metrics.json").read_text())
    assert m["bucket"] == 1 and m["allow_small_bucket"] is True
    # the leak it opted into: each hospital's padded length is its exact sample count
    sizes = sorted(size for _, size in m["layout"]["allocations"])
    assert sizes == sorted(len(h.train_labels) for h in hospitals)


# ------------------------------------------------------------- 2. uniform failure replies


def _final(grid: LocalGrid, key, layout, weights: list[bytes]):
    """A ``final`` request signed by the aggregator's key, with a fresh round id."""
    node = next(iter(grid.get_node_ids()))
    values = {
        M.STAGE: "final",
        M.ROUND_ID: secrets.token_hex(16),
        M.LAYOUT: json.dumps(layout.to_dict()),
        M.WEIGHTS: weights,
    }
    values[M.SIGNATURE] = M.sign_request(key, values, M.MSG_FINAL, node)
    message = M.Message(M.make_content(**values), dst_node_id=node, message_type=M.MSG_FINAL)
    (reply,) = grid.send_and_receive([message])
    return reply


def test_a_failed_decryption_and_a_missing_file_get_byte_identical_replies(tmp_path):
    """Two workspaces of hospital-0 (a hospital caches its data once loaded): in one the
    aggregator's ciphertext does not decrypt, in the other the hospital's data file is gone."""
    hospitals = synthetic_hospitals(n_hospitals=1, n=40, d=8)
    layout = plan_diagonal([2], slots=PARAMS.slots, n_classes=2, bucket=32, n_features=8)
    corrupt = [b"\x00corrupt ciphertext" * 8] * ((layout.n_groups + 1) * layout.n_heads)
    replies, logs = [], []
    for name, lose_data in (("decryption", False), ("missing-file", True)):
        ws = tmp_path / name
        key = provision_all(ws, hospitals)  # the aggregator's signing key
        if lose_data:
            (hospital_dir(ws, 0) / DATA).unlink()
        replies.append(_final(LocalGrid(make_hospital_app(ws), 1), key, layout, corrupt))
        logs.append((hospital_dir(ws, 0) / ERRORS).read_text())
    assert logs[0].startswith("final: CiphertextError: head from aggregator is not a valid")
    assert logs[1].startswith("final: FileNotFoundError:") and "data.npz" in logs[1]
    decryption, missing = replies
    assert decryption.has_error() and missing.has_error()
    assert decryption.error.code == missing.error.code == M.APP_RAISED
    assert decryption.error.reason.encode() == missing.error.reason.encode()
    assert decryption.error.reason == (
        "hospital-0: final failed; details are in the hospital's own errors.log"
    )


# ----------------------------------------------------- 3. no error advises an unsafe load


def _backbone_error(path) -> str:
    from medfed.embed import BackboneError, UntrainedBackboneWarning, create_backbone

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(), pytest.raises(BackboneError) as info:
        warnings.simplefilter("ignore", UntrainedBackboneWarning)
        create_backbone("deit_tiny", weights=path, img_size=32)
    return str(info.value)


def _safe_fix(text: str) -> None:
    assert not any(word in text for word in UNSAFE), text
    assert ".safetensors" in text and "torch.save(model.state_dict(), path)" in text


def test_a_text_file_as_weights_names_the_problem_and_the_safe_fix(tmp_path):
    text_file = tmp_path / "weights.pth"
    text_file.write_text("these are not the weights you are looking for\n")
    text = _backbone_error(text_file)
    assert "it is a text file, not a checkpoint" in text
    _safe_fix(text)
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert "Git LFS pointer" in _backbone_error(lfs)


def test_a_pickled_model_as_weights_is_refused_without_an_unsafe_retry(tmp_path):
    import torch

    whole = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), whole)  # a pickled module, not a state_dict
    with pytest.raises(Exception, match="weights_only"):  # torch itself advises an unsafe retry
        torch.load(whole)
    text = _backbone_error(whole)
    assert "not a plain tensor state_dict" in text and "never unpickles" in text
    _safe_fix(text)
    assert not any(word in format_user_error(MedfedError(text)) for word in UNSAFE)


def test_relayed_library_messages_lose_their_unsafe_advice(tmp_path):
    torch_text = (
        "weights_only=True blocked loading this checkpoint. If this checkpoint is trusted, "
        "retry with weights_only=False."
    )
    assert without_unsafe_advice(torch_text) == ""
    assert without_unsafe_advice("a\nmulti-line. message") == "a\nmulti-line. message"
    assert format_user_error(MedfedError(f"bad file. {torch_text}")) == "medfed: error: bad file."

    from medfed.data import DatasetError, load_dataset
    from medfed.experiments.prepare import load_features

    pickled = tmp_path / "pickled.npz"
    np.save(pickled.with_suffix(".npy"), np.array([object()], dtype=object), allow_pickle=True)
    pickled.write_bytes(pickled.with_suffix(".npy").read_bytes())
    objects = tmp_path / "objects.npz"
    np.savez(objects, train_features=np.array([object()], dtype=object))
    for path in (pickled, objects):
        for load in (load_dataset, load_features):
            try:
                load(path)
            except DatasetError as e:
                assert not any(word in str(e) for word in UNSAFE), str(e)
