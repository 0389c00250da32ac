"""Experiment sweeps: a grid of :class:`~medfed.config.SimulationConfig` cells, run resumably.

A sweep file (YAML) holds::

    name: smoke                     # optional; default: the file's stem
    description: ...                # optional, copied into the report
    base: {epochs: 2, backend: local}      # SimulationConfig keys shared by every cell
    grid: {hospitals: [2, 3], ckks: [fast-shallow, fast]}   # key -> list of values
    exclude: [{ckks: fast-shallow, sigmoid_degree: 3}]      # optional: drop combinations
    max_concurrency: 2              # optional (alias: parallel): cells in flight at once
    cpus_per_cell: 1                # optional: Ray CPUs reserved per cell
    isolate: auto                   # optional: each cell in a child process with a private
                                    # Ray (always / never; auto: cells that start Ray themselves)

Every cell is validated by ``SimulationConfig.from_dict`` (values, CKKS preset, depth) before
anything runs. A cell's id is a stable hash of its resolved config (without ``out`` and
``progress``), so the same cell in the same output directory is never run twice.

Output directory::

    cells/<cell_id>.json    one record per finished cell (done or failed), written atomically
    runs/<cell_id>/         config.yaml, metrics.json, rounds.jsonl of a done cell
    results.csv / .jsonl    rebuilt from the cell records: a row per cell, every knob and metric
    plots/*.png, report.md  see medfed.experiments.plots / .report
    sweep.yaml              the sweep as run

Resumable: a cell whose record exists and is valid is skipped; a killed sweep loses only the
cells that were running. Failed cells are recorded with their error (and rerun next time
unless ``retry_failed=False``).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfed.config import ConfigError, SimulationConfig
from medfed.experiments.results import atomic_write_text

log = logging.getLogger(__name__)

Runner = Callable[[SimulationConfig], dict]

#: Top-level keys of a sweep file.
SPEC_KEYS = (
    "name",
    "description",
    "base",
    "grid",
    "exclude",
    "max_concurrency",
    "parallel",
    "cpus_per_cell",
    "isolate",
)
#: Config keys the sweep sets itself (and the flag that does it); not part of a cell's identity.
SWEEP_OWNED = {"out": "--out DIR", "progress": "--no-progress", "ray_address": "--ray-address"}
RECORD_VERSION = 1


class SweepError(ConfigError):
    """An invalid sweep file or grid; the message names the key and the fix."""


# ----------------------------------------------------------------------------- cells


def knob_names() -> list[str]:
    """SimulationConfig keys a sweep may set (all but ``out`` and ``progress``)."""
    return [n for n in SimulationConfig.field_names() if n not in SWEEP_OWNED]


def _canon(value: Any) -> Any:
    """A JSON-stable form: integral floats as ints (``lr: 2`` == ``lr: 2.0``), sorted dicts."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    return str(value)


def identity(cfg: SimulationConfig) -> dict[str, Any]:
    """The resolved config that identifies a cell: every knob but ``out`` and ``progress``."""
    return {k: v for k, v in cfg.to_dict().items() if k not in SWEEP_OWNED}


def cell_id(cfg: SimulationConfig) -> str:
    """Stable 12-hex-digit hash of :func:`identity` (order and int/float spelling insensitive)."""
    text = json.dumps(_canon(identity(cfg)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One grid point: its id, its validated config, and the grid values that chose it."""

    cell_id: str
    config: SimulationConfig
    knobs: dict[str, Any]

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.knobs.items()) or "(base)"


# ----------------------------------------------------------------------------- spec


def _unknown(keys: Iterable[str], valid: list[str], where: str, hint: str = "") -> None:
    bad = [k for k in keys if k not in valid]
    if not bad:
        return
    parts = []
    for k in bad:
        close = difflib.get_close_matches(k, valid, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise SweepError(
        f"{where}: unknown key(s) {', '.join(parts)}; valid keys: {', '.join(valid)}.{hint}"
    )


def _knob_mapping(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SweepError(f"{where} must be a mapping of SimulationConfig keys to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    owned = [k for k in data if k in SWEEP_OWNED]
    if owned:
        flags = " / ".join(SWEEP_OWNED[k] for k in owned)
        raise SweepError(
            f"{where}: {', '.join(map(repr, owned))} is set by the sweep itself (use {flags} "
            "on the command line); remove it."
        )
    _unknown(data, knob_names(), where)
    return data


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file. :meth:`cells` expands and validates the grid."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple] = field(default_factory=dict)
    exclude: tuple[dict[str, Any], ...] = ()
    description: str = ""
    max_concurrency: int | None = None
    cpus_per_cell: float = 1.0
    isolate: str = "auto"  # "always", "never", "auto" (see _isolate)
    source: str = "sweep"

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise SweepError(f"sweep file {path} does not exist") from None
        except IsADirectoryError:
            raise SweepError(f"sweep file {path} is a directory; give a YAML file") from None
        except yaml.YAMLError as e:
            raise SweepError(f"sweep file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SweepError(
                f"sweep file {path} must hold a mapping with 'base:' and 'grid:' sections"
            )
        data.setdefault("name", path.stem)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "sweep") -> SweepSpec:
        if not isinstance(data, dict):
            raise SweepError(f"{source}: a sweep must be a mapping")
        hint = (
            " Put SimulationConfig keys under 'base:' (fixed) or 'grid:' (lists of values)."
            if any(k in SimulationConfig.field_names() for k in data)
            else ""
        )
        _unknown(data, list(SPEC_KEYS), source, hint)
        base = _knob_mapping(data.get("base"), f"{source}: base")
        grid_in = _knob_mapping(data.get("grid"), f"{source}: grid")
        grid: dict[str, tuple] = {}
        for k, values in grid_in.items():
            if not isinstance(values, list) or not values:
                raise SweepError(
                    f"{source}: grid.{k} must be a non-empty list of values, got {values!r} "
                    f"(put a single fixed value under base:, e.g. base: {{{k}: {values!r}}})"
                )
            grid[k] = tuple(values)
        exclude_in = data.get("exclude") or []
        if not isinstance(exclude_in, list):
            raise SweepError(f"{source}: exclude must be a list of mappings, e.g. [{{ckks: fast}}]")
        exclude = tuple(
            _knob_mapping(e, f"{source}: exclude[{i}]") if isinstance(e, dict) else _bad_exclude(i)
            for i, e in enumerate(exclude_in)
        )
        conc = data.get("max_concurrency", data.get("parallel"))
        if "max_concurrency" in data and "parallel" in data:
            raise SweepError(f"{source}: give either max_concurrency or parallel, not both")
        if conc is not None and (not isinstance(conc, int) or isinstance(conc, bool) or conc < 1):
            raise SweepError(f"{source}: max_concurrency must be an integer >= 1, got {conc!r}")
        cpus = data.get("cpus_per_cell", 1.0)
        if not isinstance(cpus, int | float) or isinstance(cpus, bool) or not cpus > 0:
            raise SweepError(f"{source}: cpus_per_cell must be a positive number, got {cpus!r}")
        isolate = data.get("isolate", "auto")
        if isinstance(isolate, bool):
            isolate = "always" if isolate else "never"
        if isolate not in ("auto", "always", "never"):
            raise SweepError(f"{source}: isolate must be auto, always or never, got {isolate!r}")
        name = str(data.get("name") or "sweep")
        return cls(
            name=name,
            base=base,
            grid=grid,
            exclude=exclude,
            description=str(data.get("description") or "").strip(),
            max_concurrency=conc,
            cpus_per_cell=float(cpus),
            isolate=isolate,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        d["base"] = dict(self.base)
        d["grid"] = {k: list(v) for k, v in self.grid.items()}
        if self.exclude:
            d["exclude"] = [dict(e) for e in self.exclude]
        d["max_concurrency"] = self.max_concurrency
        d["cpus_per_cell"] = self.cpus_per_cell
        d["isolate"] = self.isolate
        return d

    @property
    def varying(self) -> list[str]:
        """Grid keys with more than one value."""
        return [k for k, v in self.grid.items() if len(v) > 1]

    def cells(self) -> list[Cell]:
        """Expand the grid (in file order), drop excluded and duplicate cells, validate all.

        Raises :class:`SweepError` listing every invalid cell before anything has run.
        """
        keys = list(self.grid)
        cells: list[Cell] = []
        seen: set[str] = set()
        errors: list[str] = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            knobs = dict(zip(keys, values, strict=True))
            merged = {**self.base, **knobs}
            if any(_matches(merged, e) for e in self.exclude):
                continue
            label = " ".join(f"{k}={v}" for k, v in knobs.items()) or "(base)"
            where = f"cell {label}"
            try:
                cfg = SimulationConfig.from_dict({**merged, "progress": False}, source=where)
            except ValueError as e:  # ConfigError (unknown preset, too little depth, ...)
                msg = str(e)
                errors.append(msg if msg.startswith(where) else f"{where}: {msg}")
                continue
            cid = cell_id(cfg)
            if cid not in seen:
                seen.add(cid)
                cells.append(Cell(cid, cfg, knobs))
        if errors:
            more = f"\n  ... and {len(errors) - 8} more" if len(errors) > 8 else ""
            raise SweepError(
                f"{len(errors)} invalid cell(s) in {self.source}; nothing was run:\n  "
                + "\n  ".join(errors[:8])
                + more
                + "\nFix the values, or drop combinations with 'exclude: [{key: value, ...}]'."
            )
        if not cells:
            raise SweepError(f"{self.source}: the grid has no cells (everything is excluded)")
        return cells


def _bad_exclude(i: int) -> dict:
    raise SweepError(f"exclude[{i}] must be a mapping of keys to values, e.g. {{ckks: fast}}")


def _matches(merged: dict[str, Any], rule: dict[str, Any]) -> bool:
    defaults = SimulationConfig().to_dict()
    return all(_canon(merged.get(k, defaults[k])) == _canon(v) for k, v in rule.items())


# ----------------------------------------------------------------------------- executing


@dataclass(frozen=True)
class CellTask:
    """What a worker needs to run one cell (picklable: the runner is a module-level function)."""

    cell_id: str
    config: dict[str, Any]
    knobs: dict[str, Any]
    runner: Runner
    isolate: bool


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _isolated_call(runner: Runner, config: dict[str, Any]) -> dict:
    """Child-process entry: a private Ray for Flower, never the sweep's cluster."""
    os.environ.pop("RAY_ADDRESS", None)
    return runner(SimulationConfig.from_dict(config))


def _call_runner(runner: Runner, cfg: SimulationConfig, isolate: bool) -> dict:
    if not isolate:
        return runner(cfg)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_isolated_call, runner, cfg.to_dict()).result()


_MAX_RUN_FILE = 16 * 2**20


def execute_cell(task: CellTask) -> dict[str, Any]:
    """Run one cell and return its record; never raises for a failing cell (Ctrl-C aside)."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    t0 = time.perf_counter()
    record = _failed(task, worker={"host": socket.gethostname(), "pid": os.getpid()})
    files: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="medfed-cell-") as tmp:
            cfg = SimulationConfig.from_dict({**task.config, "out": tmp, "progress": False})
            metrics = _call_runner(task.runner, cfg, task.isolate)
            if not isinstance(metrics, dict):
                raise TypeError(f"the runner returned {type(metrics).__name__}, not a dict")
            for p in sorted(Path(tmp).rglob("*")):
                rel = p.relative_to(tmp).as_posix()
                if p.is_file() and rel not in ("config.yaml", "metrics.json"):
                    if p.stat().st_size <= _MAX_RUN_FILE:
                        files[rel] = p.read_text(errors="replace")
        record.update(status="done", metrics=_jsonable(metrics))
    except Exception as e:  # noqa: BLE001 - a failing cell is a result, recorded with its error
        record.update(error=_error_text(e), traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["files"] = files
    return record


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class SerialExecutor:
    """Runs cells one after another in this process (tests, debugging)."""

    description = "serial, in-process"

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[Any, Any, BaseException | None]]:
        for item in items:
            try:
                result = fn(item)
            except Exception as e:  # noqa: BLE001 - reported per item, like a lost Ray task
                yield item, None, e
            else:
                yield item, result, None


class RayExecutor:
    """Runs cells as Ray tasks on a cluster (``address``) or a private local Ray.

    Ray is started on first use inside the ``with`` block and shut down when it ends, so a
    sweep with nothing left to run never starts Ray.
    """

    def __init__(
        self,
        address: str | None = None,
        max_concurrency: int | None = None,
        cpus_per_cell: float = 1.0,
        num_cpus: int | None = None,
        log_to_driver: bool = False,
    ) -> None:
        self.address = address
        self.max_concurrency = max_concurrency
        self.cpus_per_cell = cpus_per_cell
        self.num_cpus = num_cpus
        self.log_to_driver = log_to_driver
        self.info = None
        self._session = None

    @property
    def description(self) -> str:
        where = self.info.describe() if self.info else (self.address or "local Ray")
        return f"Ray tasks on {where}"

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session is not None:
            session, self._session, self.info = self._session, None, None
            session.__exit__(*exc)

    def _start(self) -> None:
        if self._session is None:
            from medfed.scale.cluster import ray_session

            session = ray_session(
                self.address, num_cpus=self.num_cpus, log_to_driver=self.log_to_driver
            )
            self.info = session.__enter__()
            self._session = session

    def map_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any]
    ) -> Iterator[tuple[Any, Any, BaseException | None]]:
        items = list(items)
        if not items:
            return
        self._start()
        import ray

        if self.info is not None and self.info.cpus < self.cpus_per_cell:
            log.warning(
                "cells need %g CPUs each but the cluster has %g: they wait until it grows",
                self.cpus_per_cell,
                self.info.cpus,
            )

        remote = ray.remote(num_cpus=self.cpus_per_cell, max_retries=0)(fn)
        limit = self.max_concurrency or len(items)
        queue = iter(items)
        pending: dict[Any, Any] = {}
        try:
            while True:
                while len(pending) < limit:
                    item = next(queue, None)
                    if item is None:
                        break
                    pending[remote.remote(item)] = item
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - worker crash, cancelled task, ...
                    yield item, None, e
                else:
                    yield item, result, None
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass


# ----------------------------------------------------------------------------- records


def cells_dir(out: Path) -> Path:
    return Path(out) / "cells"


def record_path(out: Path, cid: str) -> Path:
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


# ----------------------------------------------------------------------------- the sweep


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
        return [
            c.cell_id
            for c in self.cells
            if self.records.get(c.cell_id, {}).get("status") == "failed"
        ]

    @property
    def missing(self) -> list[str]:
        return [c.cell_id for c in self.cells if c.cell_id not in self.records]


def _isolate(policy: str, cfg: SimulationConfig) -> bool:
    """auto: a child process (with a private Ray) for cells that start Ray themselves, i.e.
    Flower's simulation engine or encrypted batch workers; a Ray task holding a CPU cannot
    safely wait for actors on the same, possibly full, cluster."""
    if policy != "auto":
        return policy == "always"
    return cfg.backend == "flower" or bool(getattr(cfg, "workers", 0))


def _default_runner() -> Runner:
    from medfed.runner import run

    return run


def _summary_line(cell: Cell, record: dict[str, Any]) -> str:
    secs = record.get("seconds")
    took = f" {secs:.1f}s" if isinstance(secs, int | float) else ""
    if record["status"] != "done":
        return f"[red]failed[/red] {cell.cell_id} {cell.label()}{took}: {record['error']}"
    m = record["metrics"]
    bits = []
    for key, label, fmt in (
        ("accuracy", "acc", "{:.4f}"),
        ("reference_accuracy", "ref", "{:.4f}"),
        ("majority_accuracy", "majority", "{:.4f}"),
        ("encryption_cost_pp", "cost", "{:+.2f} pp"),
        ("approximation_gap_pp", "approx. gap", "{:+.2f} pp"),
    ):
        v = m.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v):
            bits.append(f"{label} {fmt.format(v)}")
    return f"[green]done[/green]   {cell.cell_id} {cell.label()}{took} {' '.join(bits)}".rstrip()


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    runner: Runner | None = None,
    executor: Any = None,
    *,
    progress: bool = True,
    retry_failed: bool = True,
    console: Any = None,
) -> SweepOutcome:
    """Run every cell of ``spec`` that has no valid record in ``out``; write table, plots, report.

    ``runner`` (default :func:`medfed.runner.run`) maps a SimulationConfig to a metrics dict;
    ``executor`` (default :class:`RayExecutor` on a local Ray) decides where cells run. Cells
    are validated before anything runs. On Ctrl-C the finished cells stay recorded, the table
    and report are rebuilt from them, and KeyboardInterrupt propagates.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = console or Console()
    out = Path(out)
    cells = spec.cells()
    runner = runner or _default_runner()
    if executor is None:
        executor = RayExecutor(
            max_concurrency=spec.max_concurrency, cpus_per_cell=spec.cpus_per_cell
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))

    records: dict[str, dict] = {}
    for c in cells:
        r = load_record(out, c.cell_id)
        if r is not None and (r["status"] == "done" or not retry_failed):
            records[c.cell_id] = r
    todo = [c for c in cells if c.cell_id not in records]
    skipped = [c.cell_id for c in cells if c.cell_id in records]
    by_id = {c.cell_id: c for c in cells}
    outcome = SweepOutcome(out, cells, records, [], skipped, [])
    console.print(
        f"sweep [bold]{spec.name}[/bold]: {len(cells)} cells, {len(skipped)} already in "
        f"{out}, {len(todo)} to run"
    )

    tasks = [
        CellTask(
            c.cell_id,
            identity(c.config),
            c.knobs,
            runner,
            _isolate(spec.isolate, c.config),
        )
        for c in todo
    ]
    try:
        if tasks:
            columns = (
                TextColumn("[bold]cells"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TimeElapsedColumn(),
            )
            with (
                executor,
                Progress(*columns, console=console, disable=not progress) as bar,
            ):
                task_id = bar.add_task("cells", total=len(tasks), failed=0)
                for task, record, error in executor.map_unordered(execute_cell, tasks):
                    if error is not None:
                        record = failed_record(task, error)
                    store_record(out, record)
                    records[task.cell_id] = record
                    outcome.ran.append(task.cell_id)
                    bar.console.print(_summary_line(by_id[task.cell_id], record), soft_wrap=True)
                    n_failed = sum(1 for i in outcome.ran if records[i]["status"] == "failed")
                    bar.update(task_id, advance=1, failed=n_failed)
                desc = getattr(executor, "description", type(executor).__name__)
                console.print(f"ran {len(outcome.ran)} cell(s) with {desc}", soft_wrap=True)
    except BaseException as e:
        outcome.interrupted = isinstance(e, KeyboardInterrupt)
        try:
            _finish(spec, outcome)
        except Exception:  # noqa: BLE001 - never mask the original error
            log.exception("could not rebuild the results of %s", out)
        raise
    _finish(spec, outcome)
    return outcome


def _finish(spec: SweepSpec, outcome: SweepOutcome) -> None:
    """Rebuild the table, plots and report from the records (also after Ctrl-C)."""
    from medfed.experiments.plots import make_plots
    from medfed.experiments.report import write_report

    outcome.rows = write_table(outcome.out, outcome.cells, outcome.records)
    outcome.plots = make_plots(outcome.rows, outcome.out / "plots")
    write_report(outcome.out / "report.md", spec, outcome)
