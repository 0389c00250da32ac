"""The sweep spec: a sweep file parsed into :class:`SweepSpec`, expanded into :class:`Cell` s.

A sweep file (YAML) holds::

    name: smoke                     # optional; default: the file's stem
    description: ...                # optional, copied into the report
    base: {epochs: 2, backend: local}      # SimulationConfig keys shared by every cell
    grid: {hospitals: [2, 3], ckks: [fast, standard]}        # key -> list of values
    exclude: [{ckks: fast, sigmoid_degree: 5}]              # optional: drop combinations
    max_concurrency: 2              # optional (alias: parallel): cells in flight at once
    cpus_per_cell: 1                # optional: Ray CPUs reserved per cell
    isolate: auto                   # optional: each cell in a child process with a private
                                    # Ray (always / never; auto: cells that start Ray themselves)

A ``base`` option that only other modes take (``dropouts``: mode updates) is left out of a cell
whose grid sets another mode, so one file can sweep both modes. Every cell is validated by
``SimulationConfig.from_dict`` (values, CKKS preset, depth) before
anything runs. A cell's id is a stable hash of its resolved config (without ``out`` and
``progress``), so the same cell in the same output directory is never run twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfed.config import ConfigError, SimulationConfig, mode_names, mode_spec
from medfed.errors import unknown_keys

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
        """The grid values that chose this cell, as ``k=v`` pairs (``(base)`` if none)."""
        return " ".join(f"{k}={v}" for k, v in self.knobs.items()) or "(base)"


# ----------------------------------------------------------------------------- spec


def _unknown(keys: Iterable[str], valid: list[str], where: str, hint: str = "") -> None:
    bad = [k for k in keys if k not in valid]
    if not bad:
        return
    raise SweepError(
        f"{where}: unknown key(s) {unknown_keys(bad, valid)}; valid keys: {', '.join(valid)}.{hint}"
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
    isolate: str = "auto"  # "always", "never", "auto" (see loop._isolate)
    source: str = "sweep"

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        """Read and parse a sweep file (the name defaults to the file's stem)."""
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
        """Parse and check a sweep mapping; ``source`` names it in error messages."""
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
        """The sweep as a mapping :meth:`from_dict` reads back (written as ``sweep.yaml``)."""
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
            merged = {**_for_mode(self.base, knobs.get("mode")), **knobs}
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


def _for_mode(base: dict[str, Any], mode: str | None) -> dict[str, Any]:
    """``base`` for a cell whose grid sets ``mode``: without the options only other modes take
    (``dropouts`` in base means mode updates' dropouts; a mode embeddings cell leaves it
    out)."""
    if mode is None or mode not in mode_names():
        return base  # the config check names an unknown mode
    own = mode_spec(mode).options
    foreign = {n for m in mode_names() for n in mode_spec(m).options} - set(own)
    return {k: v for k, v in base.items() if k not in foreign}


def _bad_exclude(i: int) -> dict:
    raise SweepError(f"exclude[{i}] must be a mapping of keys to values, e.g. {{ckks: fast}}")


def _matches(merged: dict[str, Any], rule: dict[str, Any]) -> bool:
    defaults = SimulationConfig().to_dict()
    return all(_canon(merged.get(k, defaults[k])) == _canon(v) for k, v in rule.items())


@dataclass(frozen=True)
class CellTask:
    """What a worker needs to run one cell (picklable: the runner is a module-level function)."""

    cell_id: str
    config: dict[str, Any]
    knobs: dict[str, Any]
    runner: Runner
    isolate: bool
