"""The results table (``results.csv`` / ``.jsonl``) and :class:`SweepOutcome`, what a sweep did.

Both are built from cell records only; plots and the report read them, never the run loop.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.experiments.results import atomic_write_text
from medfed.experiments.sweep.spec import Cell, _canon, identity, knob_names


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def flat_row(cell: Cell, record: dict[str, Any]) -> dict[str, Any]:
    """One table row: id, status, every knob, every metric (nested keys joined by '.')."""
    row: dict[str, Any] = {"cell_id": cell.cell_id, "status": record["status"]}
    for k, v in identity(cell.config).items():
        row[k] = json.dumps(v) if isinstance(v, list | dict) else v
    metrics: dict[str, Any] = {}
    _flatten("", record.get("metrics") or {}, metrics)
    for k, v in metrics.items():
        if k in row:
            if _canon(row[k]) == _canon(v):
                continue
            k = f"metric.{k}"
        row[k] = v
    row["seconds"] = record.get("seconds")
    row["error"] = record.get("error")
    return row


def write_table(out: Path, cells: list[Cell], records: dict[str, dict]) -> list[dict]:
    """results.csv and results.jsonl for the cells that have a record, in grid order."""
    done = [c for c in cells if c.cell_id in records]
    rows = [flat_row(c, records[c.cell_id]) for c in done]
    head = ["cell_id", "status", *knob_names()]
    tail = ["seconds", "error"]
    columns: dict[str, None] = dict.fromkeys(head)
    for r in rows:
        columns.update(dict.fromkeys(k for k in r if k not in tail))
    columns.update(dict.fromkeys(tail))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    atomic_write_text(Path(out) / "results.csv", buf.getvalue())
    lines = [json.dumps({**records[c.cell_id], "knobs": c.knobs}) + "\n" for c in done]
    atomic_write_text(Path(out) / "results.jsonl", "".join(lines))
    return rows


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did and wrote."""

    out: Path
    cells: list[Cell]
    records: dict[str, dict]
    ran: list[str]
    skipped: list[str]
    rows: list[dict]
    plots: list[Any] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[str]:
        """Ids of the cells whose record says failed, in grid order."""
        return [
            c.cell_id
            for c in self.cells
            if self.records.get(c.cell_id, {}).get("status") == "failed"
        ]

    @property
    def missing(self) -> list[str]:
        """Ids of the cells with no record (not run yet, or interrupted)."""
        return [c.cell_id for c in self.cells if c.cell_id not in self.records]
