"""Executors: where a sweep's cells run (serially in-process, or as Ray tasks), and how.

:func:`execute_cell` runs one :class:`~medfed.experiments.sweep.spec.CellTask` (optionally in
an isolated child process with a private Ray) and turns its outcome into a record.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from medfed.config import SimulationConfig
from medfed.experiments.sweep.spec import CellTask, Runner
from medfed.experiments.sweep.store import _error_text, _failed

log = logging.getLogger(__name__)


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
    return _as_dict(runner(SimulationConfig.from_dict(config)))


def _as_dict(metrics: Any) -> Any:
    """A run's metrics as a dict: a RunResult (a read-only Mapping) is read as one."""
    return dict(metrics) if isinstance(metrics, Mapping) else metrics


def _call_runner(runner: Runner, cfg: SimulationConfig, isolate: bool) -> dict:
    if not isolate:
        return _as_dict(runner(cfg))
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
        """Yield ``(item, fn(item), None)``, or ``(item, None, error)`` when ``fn`` raised."""
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
        """Where the cells run, for the sweep's closing line."""
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
        """Run ``fn`` on each item as a Ray task; yield ``(item, result, error)`` as they finish."""
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
