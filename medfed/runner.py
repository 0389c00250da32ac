"""One federation run, start to finish, in whatever mode the config names.

:func:`run` and :func:`federate` look the mode up in the registry (:mod:`medfed.modes`) and
return a :class:`~medfed.result.RunResult`; :func:`print_summary` prints the mode's table. The
drivers themselves live in :mod:`medfed.modes.embeddings` and :mod:`medfed.modes.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medfed.config import SimulationConfig
from medfed.modes import get_mode
from medfed.result import RunResult

if TYPE_CHECKING:
    from rich.console import Console

    from medfed.fl.workspace import HospitalData

# TenSEAL, Flower and torch are imported inside the modes' methods: mode "updates" with
# threshold keys runs in a Python 3.10 environment that has none of them.


def run(cfg: SimulationConfig) -> RunResult:
    """Prepare the data (load, validate, embed, partition), then federate them, in
    ``cfg.mode``; with ``cfg.out`` set, the run files are written there."""
    return RunResult.from_metrics(get_mode(cfg.mode).run(cfg))


def federate(
    cfg: SimulationConfig,
    hospitals: list[HospitalData],
    n_classes: int,
    described: dict[str, Any],
    started: float | None = None,
) -> RunResult:
    """Run the federation of ``cfg.mode`` and its plaintext references on prepared hospitals.

    ``started`` (a :func:`time.perf_counter` value) is when the run began; None: now.
    """
    mode = get_mode(cfg.mode)
    return RunResult.from_metrics(mode.federate(cfg, hospitals, n_classes, described, started))


def print_summary(result: RunResult | Mapping[str, Any], console: Console | None = None) -> None:
    """Print a run's summary: its mode's table (:meth:`~medfed.modes.Mode.summary_table`;
    a generic one for a mode not registered here), the bytes per party, exclusions, warnings.

    ``result``: a :class:`~medfed.result.RunResult` or its metrics (e.g. a loaded
    ``metrics.json``).
    """
    from medfed.experiments.results import print_summary as print_tables
    from medfed.modes import UnknownModeError

    try:
        table = get_mode(str(result.get("mode"))).summary_table(result)
    except UnknownModeError:
        table = None
    print_tables(result, console, table)
