"""Run outputs: metrics.json, the resolved config, per-round records, and the summary table.

Files are written atomically (temp file + rename), so a killed run never leaves a half-written
file that a rerun would trust.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run(out: Path, config: dict, metrics: dict, rounds: list[dict]) -> None:
    out = Path(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in rounds))
    atomic_write_text(out / "metrics.json", json.dumps(_finite(metrics), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """NaN/Inf become null: metrics.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def summary_table(metrics: dict[str, Any]) -> Table:
    t = Table(
        title=f"medfed: {metrics['hospitals']} hospitals, mode {metrics['mode']}, "
        f"{metrics['keys']} key, CKKS {metrics['ckks']['name']}"
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("dataset", f"{metrics['dataset']} ({metrics['n_classes']} classes)")
    t.add_row("backbone", f"{metrics['backbone']} ({metrics['backbone_weights']})")
    t.add_row("accuracy (encrypted training)", f"{metrics['accuracy']:.4f}")
    t.add_row("plaintext accuracy (same schedule)", f"{metrics['plaintext_accuracy']:.4f}")
    t.add_row("gap (pp)", f"{100 * (metrics['accuracy'] - metrics['plaintext_accuracy']):+.2f}")
    t.add_row("exact logistic regression", f"{metrics['exact_accuracy']:.4f}")
    t.add_row("wall time", f"{metrics['wall_seconds']:.1f} s")
    t.add_row("bytes up (hospitals -> aggregator)", _mb(metrics["bytes_up"]))
    t.add_row("bytes down (aggregator -> hospitals)", _mb(metrics["bytes_down"]))
    return t


def parties_table(metrics: dict[str, Any]) -> Table:
    t = Table(title="bytes per party")
    t.add_column("party")
    t.add_column("sent", justify="right")
    t.add_column("received", justify="right")
    for name, v in metrics["bytes_per_party"].items():
        t.add_row(name, _mb(v["sent"]), _mb(v["received"]))
    return t


def print_summary(metrics: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(metrics))
    console.print(parties_table(metrics))
    if metrics.get("excluded"):
        console.print(f"[yellow]excluded contributions: {metrics['excluded']}[/yellow]")
    if not metrics.get("backbone_pretrained", True):
        console.print(
            "[bold red]The backbone is UNTRAINED (random weights): accuracy is not "
            "representative of a pretrained DeiT. Pass --weights FILE.[/bold red]"
        )
