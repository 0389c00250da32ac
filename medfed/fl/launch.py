"""Run the aggregator and the hospitals: Flower's Ray simulation engine, or in-process."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.fl.faults import Fault, with_faults
from medfed.fl.local_grid import LocalGrid
from medfed.fl.messages import FederationError

if TYPE_CHECKING:
    from medfed.fl.aggregator import AggregatorSettings
    from medfed.fl.updates import UpdatesSettings

log = logging.getLogger(__name__)


def _quiet_flower_deprecation() -> None:
    """``run_simulation`` logs a deprecation banner meant for app authors, not medfed users."""
    for handler in logging.getLogger("flwr").handlers:
        handler.addFilter(lambda r: "DEPRECATED FEATURE" not in r.getMessage())


def run_federation(
    workspace: Path,
    settings: AggregatorSettings | UpdatesSettings,
    n_hospitals: int,
    backend: str = "flower",
    client_cpus: float = 1.0,
    on_step: Callable[[int], None] | None = None,
    ray_address: str | None = None,
    unresponsive: dict[int, int] | None = None,
    faults: Sequence[Fault] = (),
) -> dict:
    """Returns what the aggregator recorded (bytes, rounds, exclusions); raises on failure.

    ``settings`` picks the mode: :class:`~medfed.fl.aggregator.AggregatorSettings` runs mode
    "embeddings", :class:`~medfed.fl.updates.UpdatesSettings` mode "updates" (imported only
    then: its threshold keys run where TenSEAL is absent). ``unresponsive`` (local backend):
    hospital index -> protocol round from which it stops answering (simulated dropouts).
    ``faults`` (:mod:`medfed.fl.faults`, ``--inject``) wrap every hospital in a fault mod.
    """
    if getattr(settings, "mode", "embeddings") == "updates":
        from medfed.fl.updates import FedAvgUpdatesStrategy as Strategy
        from medfed.fl.updates import make_updates_hospital_app as make_hospital_app
        from medfed.fl.updates import make_updates_server_app as make_aggregator_app
    else:
        from medfed.fl.aggregator import EncryptedEmbeddingsStrategy as Strategy
        from medfed.fl.aggregator import make_aggregator_app
        from medfed.fl.hospital import make_hospital_app
    client_app = with_faults(make_hospital_app(workspace), faults)
    if backend == "local":
        strategy = Strategy(settings, on_step=on_step)
        if settings.workers == 0:
            return strategy.run(LocalGrid(client_app, n_hospitals, unresponsive=unresponsive))
        from medfed.scale.cluster import ray_session, resolve_address

        with ray_session(resolve_address(ray_address)):
            return strategy.run(LocalGrid(client_app, n_hospitals))
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    _quiet_flower_deprecation()

    results: dict = {}
    server_app = make_aggregator_app(settings, results, on_step=on_step)
    from medfed.scale.cluster import resolve_address

    # "local": a private instance, never a cluster that `ray start` left on this machine
    init_args = {"address": "local", "num_cpus": os.cpu_count() or 2, "include_dashboard": False}
    address = resolve_address(ray_address)
    if address:  # Flower's simulation engine joins the running cluster
        init_args = {"address": address}
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n_hospitals,
        backend_config=backend_config,
    )
    if "error" in results or "bytes_up" not in results:
        raise FederationError(
            f"the federation failed: {results.get('error', 'the ServerApp returned no result')}"
        )
    return results
