"""The record store: one JSON record per finished cell under ``cells/``, run files under ``runs/``.

A record (done or failed) is written atomically after the cell's run files, so its existence
marks the cell finished; :func:`load_record` trusts only complete records of the right cell.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Any

import yaml

from medfed.experiments.results import atomic_write_text
from medfed.experiments.sweep.spec import CellTask

RECORD_VERSION = 1


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cells_dir(out: Path) -> Path:
    """The directory of the cell records in the sweep's output directory ``out``."""
    return Path(out) / "cells"


def record_path(out: Path, cid: str) -> Path:
    """Where cell ``cid``'s record lives in ``out``."""
    return cells_dir(out) / f"{cid}.json"


def load_record(out: Path, cid: str) -> dict[str, Any] | None:
    """A cell's record, or None when absent, unreadable, partial or not this cell's."""
    path = record_path(out, cid)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("cell_id") != cid:
        return None
    if record.get("status") == "done" and isinstance(record.get("metrics"), dict):
        return record
    if record.get("status") == "failed" and isinstance(record.get("error"), str):
        return record
    return None


def store_record(out: Path, record: dict[str, Any]) -> None:
    """Write the cell's run files, then its record (the record's existence marks it finished)."""
    out = Path(out)
    cid = record["cell_id"]
    files = record.pop("files", None) or {}
    if record["status"] == "done":
        run_dir = out / "runs" / cid
        atomic_write_text(
            run_dir / "config.yaml",
            yaml.safe_dump({**record["config"], "out": str(run_dir)}, sort_keys=False),
        )
        for rel, text in files.items():
            atomic_write_text(run_dir / rel, text)
        atomic_write_text(run_dir / "metrics.json", json.dumps(record["metrics"], indent=2) + "\n")
    atomic_write_text(record_path(out, cid), json.dumps(record, indent=2) + "\n")


def _failed(task: CellTask, **fields: Any) -> dict[str, Any]:
    """A cell's record, failed until a run says otherwise."""
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "cell_id": task.cell_id,
        "status": "failed",
        "knobs": task.knobs,
        "config": task.config,
        "metrics": None,
        "error": None,
        "traceback": None,
        "worker": None,
    }
    record.update(fields)
    return record


def failed_record(task: CellTask, error: BaseException) -> dict[str, Any]:
    """The record for a cell whose task was lost (worker crash, cancellation)."""
    return _failed(
        task,
        error=_error_text(error),
        traceback=_ANSI.sub("", "".join(traceback.format_exception(error))),
        seconds=None,
    )
