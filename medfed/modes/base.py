"""The :class:`Mode` interface: what a federation mode declares and does.

A mode is a name, the key setups it accepts, the config fields only it uses, its own config
checks, and :meth:`Mode.federate` (the federation plus its plaintext references, returning
the run's metrics); :meth:`Mode.summary_table` is optional. A mode module is cheap to import
(:func:`medfed.modes.get_mode` imports it on first use): it imports torch, TenSEAL and
Flower only inside the methods that run a federation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from rich.table import Table

    from medfed.config import ModeSpec, SimulationConfig
    from medfed.fl.launch import FederationApps
    from medfed.fl.workspace import HospitalData


class Prepared(NamedTuple):
    """A mode's hospitals, ready to federate."""

    hospitals: list[HospitalData]
    n_classes: int
    described: dict[str, Any]  # dataset, backbone, ...: labels the results


class Mode:
    """One way to federate: subclass, set ``name`` and ``keys``, implement :meth:`federate`,
    then :func:`medfed.modes.register_mode` an instance.

    ``keys`` are the key setups it accepts; ``options`` maps the
    :class:`~medfed.config.SimulationConfig` fields only this mode uses to their defaults (any
    other mode refuses a config that sets them).
    """

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ("shared",)
    options: ClassVar[Mapping[str, Any]] = {}
    #: A built-in mode's static data in :mod:`medfed.config`: name, keys, options, its checks
    #: and fault stages come from it.
    spec: ClassVar[ModeSpec | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.name, cls.keys, cls.options = spec.name, spec.keys, spec.options

    def validate(self, cfg: SimulationConfig) -> None:
        """Mode-specific checks of a config, run when it is built (``cfg.keys`` is already
        one of :attr:`keys`); raise :class:`~medfed.config.ConfigError` naming the fix."""
        if self.spec is not None and self.spec.check is not None:
            self.spec.check(cfg)

    def fault_stages(self) -> tuple[str, ...]:
        """Protocol stages ``--inject`` may name besides the generic ones."""
        if self.spec is not None and self.spec.fault_stages is not None:
            return self.spec.fault_stages()
        return ()

    def prepare(self, cfg: SimulationConfig) -> Prepared:
        """Load, embed and partition the data (default: the MedMNIST embeddings pipeline)."""
        from medfed.experiments.prepare import prepare

        data = prepare(cfg)
        return Prepared(data.hospitals, data.dataset.n_classes, data.described)

    def federate(
        self,
        cfg: SimulationConfig,
        hospitals: list[HospitalData],
        n_classes: int,
        described: dict[str, Any],
        started: float | None = None,
    ) -> dict[str, Any]:
        """Run the federation and its plaintext references; return the run's metrics (with
        ``cfg.out`` set, also write the run files, see :func:`medfed.modes.common.finish`).

        ``started`` (a :func:`time.perf_counter` value) is when the run began, for
        ``wall_seconds``; None: now.
        """
        raise NotImplementedError(f"mode {self.name!r} does not implement federate")

    def run(self, cfg: SimulationConfig) -> dict[str, Any]:
        """:meth:`prepare`, then :meth:`federate`; ``wall_seconds`` counts both."""
        started = time.perf_counter()
        hospitals, n_classes, described = self.prepare(cfg)
        return self.federate(cfg, hospitals, n_classes, described, started)

    def federation_apps(self) -> FederationApps:
        """The aggregator and Flower apps, for modes that run through
        :func:`medfed.fl.launch.run_federation`."""
        raise NotImplementedError(f"mode {self.name!r} has no Flower apps")

    def summary_table(self, metrics: Mapping[str, Any]) -> Table:
        """The table :func:`medfed.print_summary` prints for this mode's runs (default: the
        accuracy rows, wall time and traffic)."""
        from medfed.experiments.results import run_table

        return run_table(metrics)

    def __repr__(self) -> str:
        return f"<medfed mode {self.name!r}, keys {', '.join(self.keys)}>"
