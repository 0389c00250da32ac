"""Experiment sweeps: a grid of :class:`~medfed.config.SimulationConfig` cells, run resumably.

Modules, each depending only on those above it:

* :mod:`.spec` -- the sweep file (:class:`SweepSpec`), its cells and their ids, knob parsing
* :mod:`.store` -- the cell records under ``cells/`` and the run files under ``runs/``
* :mod:`.table` -- ``results.csv`` / ``.jsonl`` and :class:`SweepOutcome`
* :mod:`.executors` -- :class:`SerialExecutor`, :class:`RayExecutor`, :func:`execute_cell`
* :mod:`.loop` -- :func:`run_sweep`, which then calls :mod:`medfed.experiments.plots` and
  :mod:`medfed.experiments.report` (they import :mod:`.spec` / :mod:`.table`, never the loop)

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

from medfed.experiments.sweep.executors import RayExecutor, SerialExecutor, execute_cell
from medfed.experiments.sweep.loop import run_sweep
from medfed.experiments.sweep.spec import (
    SPEC_KEYS,
    SWEEP_OWNED,
    Cell,
    CellTask,
    Runner,
    SweepError,
    SweepSpec,
    cell_id,
    identity,
    knob_names,
)
from medfed.experiments.sweep.store import (
    RECORD_VERSION,
    cells_dir,
    failed_record,
    load_record,
    record_path,
    store_record,
)
from medfed.experiments.sweep.table import SweepOutcome, flat_row, write_table

__all__ = [
    "RECORD_VERSION",
    "SPEC_KEYS",
    "SWEEP_OWNED",
    "Cell",
    "CellTask",
    "RayExecutor",
    "Runner",
    "SerialExecutor",
    "SweepError",
    "SweepOutcome",
    "SweepSpec",
    "cell_id",
    "cells_dir",
    "execute_cell",
    "failed_record",
    "flat_row",
    "identity",
    "knob_names",
    "load_record",
    "record_path",
    "run_sweep",
    "store_record",
    "write_table",
]
