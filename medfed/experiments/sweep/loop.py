"""The run loop: :func:`run_sweep` runs the cells without a valid record, then rebuilds the
table, plots and report from all records (also after Ctrl-C)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml

from medfed.config import SimulationConfig
from medfed.experiments.results import atomic_write_text
from medfed.experiments.sweep.executors import RayExecutor, execute_cell
from medfed.experiments.sweep.spec import Cell, CellTask, Runner, SweepSpec, identity
from medfed.experiments.sweep.store import failed_record, load_record, store_record
from medfed.experiments.sweep.table import SweepOutcome, write_table

log = logging.getLogger(__name__)


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
    # Imported here, not at the top: plots and report import .spec / .table, which runs this
    # package's __init__ and so this module; a top-level import would break importing plots
    # or report first. The dependency stays one-way: only this loop calls them.
    from medfed.experiments.plots import make_plots
    from medfed.experiments.report import write_report

    outcome.rows = write_table(outcome.out, outcome.cells, outcome.records)
    outcome.plots = make_plots(outcome.rows, outcome.out / "plots")
    write_report(outcome.out / "report.md", spec, outcome)
