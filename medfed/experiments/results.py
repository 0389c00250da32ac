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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a hidden temporary file in the same directory (``.<name>.*.tmp``, which
    no reader looks at), is flushed to disk, then renamed over ``path`` (atomic on POSIX). A
    run killed before the rename leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
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


def _num(value: Any, fmt: str) -> str:
    """``fmt`` of a number; "n/a" for None/NaN (a metric that is undefined for this run)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


#: One line per accuracy row of the summary tables (printed as the table's caption).
YARDSTICK_NOTES = (
    "accuracy, AUC: the {head}, on the evaluators' test samples",
    "AUC: binary ROC AUC; several classes: macro one-vs-rest AUC of the softmax",
    "tuned reference: scaled LogisticRegressionCV, pooled plaintext train data",
    "majority class: always predict the most frequent train label",
    "encryption cost: reference accuracy - accuracy, in pp (the headline)",
    "{same_row}: {same}",
    "approximation gap: accuracy - {same_row}, in pp (CKKS alone)",
)


def _yardstick_rows(t: Table, metrics: dict[str, Any], head: str, same: str) -> None:
    m = metrics
    t.add_row(f"accuracy ({head})", _num(m["accuracy"], "{:.4f}"))
    t.add_row(f"AUC ({head})", _num(m.get("auc"), "{:.4f}"))
    t.add_row(
        "tuned plaintext reference (acc. / AUC)",
        f"{_num(m.get('reference_accuracy'), '{:.4f}')} / {_num(m.get('reference_auc'), '{:.4f}')}",
    )
    t.add_row("majority class (acc.)", _num(m.get("majority_accuracy"), "{:.4f}"))
    t.add_row(
        "[bold]encryption cost (pp)[/bold]",
        f"[bold]{_num(m.get('encryption_cost_pp'), '{:+.2f}')}[/bold]",
    )
    t.add_row(
        f"{same} (acc. / AUC)",
        f"{_num(m['plaintext_accuracy'], '{:.4f}')} / {_num(m.get('plaintext_auc'), '{:.4f}')}",
    )
    t.add_row("approximation gap (pp)", _num(m.get("approximation_gap_pp"), "{:+.2f}"))


def _caption(head: str, same_row: str, same: str) -> str:
    return "\n".join(n.format(head=head, same_row=same_row, same=same) for n in YARDSTICK_NOTES)


def summary_table(metrics: dict[str, Any]) -> Table:
    t = Table(
        title=f"medfed: {metrics['hospitals']} hospitals, mode {metrics['mode']}, "
        f"{metrics['keys']} key, CKKS {metrics['ckks']['name']}",
        caption=_caption(
            "encrypted-trained head",
            "same-schedule plaintext",
            "the encrypted loop, layout and polynomial on numpy",
        ),
        caption_justify="left",
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("dataset", f"{metrics['dataset']} ({metrics['n_classes']} classes)")
    t.add_row("backbone", f"{metrics.get('backbone')} ({metrics.get('backbone_weights')})")
    _yardstick_rows(t, metrics, "encrypted training", "same-schedule plaintext")
    t.add_row("wall time", f"{metrics['wall_seconds']:.1f} s")
    t.add_row("bytes up (hospitals -> aggregator)", _mb(metrics["bytes_up"]))
    t.add_row("bytes down (aggregator -> hospitals)", _mb(metrics["bytes_down"]))
    return t


def updates_summary_table(metrics: dict[str, Any]) -> Table:
    """Mode "updates": federated (encrypted-sum) FedAvg against plain FedAvg."""
    th = metrics.get("threshold")
    keys = f"{metrics['keys']} keys" + (f" ({th['t']}-of-{th['n']})" if th else "")
    t = Table(
        title=f"medfed: {metrics['hospitals']} hospitals, mode updates, {keys}",
        caption=_caption(
            "federated head",
            "plain FedAvg",
            "same split, seed, schedule and participants per round",
        ),
        caption_justify="left",
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("dataset", f"{metrics['dataset']} ({metrics['n_classes']} classes)")
    t.add_row("backbone", f"{metrics.get('backbone')} ({metrics.get('backbone_weights')})")
    t.add_row("rounds x local epochs", f"{metrics['rounds']} x {metrics['local_epochs']}")
    _yardstick_rows(t, metrics, "federated head", "plain FedAvg")
    if metrics.get("dropouts"):
        gone = ", ".join(d["hospital"] for d in metrics.get("dropped", [])) or "none"
        t.add_row("dropouts (from round)", f"{gone} ({metrics.get('dropout_round')})")
    t.add_row("wall time", f"{metrics['wall_seconds']:.1f} s")
    t.add_row("bytes up (hospitals -> aggregator)", _mb(metrics["bytes_up"]))
    t.add_row("bytes down (aggregator -> hospitals)", _mb(metrics["bytes_down"]))
    per = metrics["bytes_per_round"]
    t.add_row(
        "per hospital per round (sent/recv)",
        f"{_mb(int(per['sent']))} / {_mb(int(per['received']))}",
    )
    return t


def parties_table(metrics: dict[str, Any]) -> Table:
    t = Table(title="bytes per party")
    t.add_column("party")
    t.add_column("sent", justify="right")
    t.add_column("received", justify="right")
    for name, v in metrics["bytes_per_party"].items():
        t.add_row(name, _mb(v["sent"]), _mb(v["received"]))
    return t


def excluded_table(excluded: list[dict]) -> Table:
    t = Table(title="excluded contributions", title_style="bold yellow")
    for column in ("stage", "hospital", "reason"):
        t.add_column(column, overflow="fold")
    for e in excluded:
        t.add_row(str(e["stage"]), str(e["hospital"]), str(e["reason"]))
    return t


def print_summary(metrics: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    updates = metrics.get("mode") == "updates"
    console.print(updates_summary_table(metrics) if updates else summary_table(metrics))
    console.print(parties_table(metrics))
    if metrics.get("excluded"):
        console.print(excluded_table(metrics["excluded"]))
    z, radius = metrics.get("max_abs_z"), (metrics.get("sigmoid") or {}).get("radius")
    if z is not None and radius is not None and z > radius:
        console.print(
            f"[bold red]|z| reached {z:.1f} on the training data, beyond the polynomial's range "
            f"[-{radius:g}, {radius:g}]: training may have diverged. Raise --l2 or "
            "--sigmoid-radius, or lower --lr.[/bold red]"
        )
    if not metrics.get("backbone_pretrained", True):
        console.print(
            "[bold red]The backbone is UNTRAINED (random weights): accuracy is not "
            "representative of a pretrained DeiT. Pass --weights FILE.[/bold red]"
        )


def progress_bar(label: str, enabled: bool = True) -> Progress:
    """The bar every long federation stage shows (rounds or epochs done, elapsed time)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def byte_tally(fed: dict) -> tuple[int, int, dict[str, dict[str, int]]]:
    """(bytes up, bytes down, per party sent/received) from the aggregator's ledger."""
    up = int(sum(fed["bytes_up"].values()))
    down = int(sum(fed["bytes_down"].values()))
    parties = {
        name: {"sent": fed["bytes_up"].get(name, 0), "received": fed["bytes_down"].get(name, 0)}
        for name in sorted(set(fed["bytes_up"]) | set(fed["bytes_down"]))
    }
    parties["aggregator"] = {"sent": down, "received": up}
    return up, down, parties
