"""Run the aggregator and the hospitals: Flower's Ray simulation engine, or in-process."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from medfed.fl.faults import Fault, fault_mods
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


def _forward_actor_output() -> bool:
    """Ray's ``log_to_driver`` for Flower's simulation engine: only with ``-v`` (DEBUG).

    What the hospitals' Ray actors print themselves is noise on this console: Flower's
    ``(ClientAppActor pid=...) WARNING: Manually terminating ClientAppActor``, once per actor
    that Ray's log monitor forwards before ``ray.shutdown()`` at the end of every run, and
    the native backtrace a crashing actor writes (``*** SIGSEGV received ... PC: @ ...``).
    Failures do not need that way: a hospital's exception comes back to this process as its
    task's error (the aggregator excludes the hospital with the reason) and a dead actor is
    reported by Ray's error listener, both with ``log_to_driver=False`` too, and both go to
    the reports file of :func:`medfed.scale.cluster.ray_reports_to_file`, whose path the
    first one prints. What a dying worker writes itself stays in Ray's session logs
    (``worker-*.err`` beside that file); ``-v`` forwards it. This is Flower's own
    ``init_args.log_to_driver`` setting (default True), as
    :func:`medfed.scale.cluster.ray_session` does for medfed's own Ray sessions.
    """
    return log.isEnabledFor(logging.DEBUG)


#: Ray options of the hospitals' actors, beside their resources (Flower's simulation engine
#: passes ``client_resources`` to ``ClientAppActor.options``). Flower's actor pool keeps an
#: actor whose process died (killed under memory pressure, where Ray's memory monitor and the
#: kernel both pick Ray workers first, or a native crash) and hands it the next messages, of
#: any hospital, which then fail at once: one dead process used to fail most hospitals of a
#: round, the lead's public-context fallback included. Ray restarts such an actor instead (up
#: to 3 times) and runs the interrupted message again once; a hospital whose process dies
#: twice on one message is excluded from that round, and only that hospital. The bounds keep a
#: machine that stays out of memory from restarting actors forever: the run stops instead.
ACTOR_RECOVERY = {"max_restarts": 3, "max_task_retries": 1}


class FederationApps(NamedTuple):
    """A mode's protocol: what :func:`run_federation` runs."""

    aggregator: type  # aggregator(settings, on_step=...); .run(grid) on the local backend
    hospital_app: Callable[..., Any]  # (workspace, mods=[...]) -> the hospitals' ClientApp
    server_app: Callable[..., Any]  # (settings, results, on_step=...) -> the ServerApp


def _embeddings_apps() -> FederationApps:
    from medfed.fl.aggregator import EmbeddingsAggregator, make_aggregator_app
    from medfed.fl.hospital import make_hospital_app

    return FederationApps(EmbeddingsAggregator, make_hospital_app, make_aggregator_app)


def _updates_apps() -> FederationApps:
    from medfed.fl.updates import (
        UpdatesAggregator,
        make_updates_hospital_app,
        make_updates_server_app,
    )

    return FederationApps(UpdatesAggregator, make_updates_hospital_app, make_updates_server_app)


def _threshold_embeddings_apps() -> FederationApps:
    from medfed.fl.threshold_embeddings import (
        ThresholdEmbeddingsAggregator,
        make_threshold_embeddings_hospital_app,
        make_threshold_embeddings_server_app,
    )

    return FederationApps(
        ThresholdEmbeddingsAggregator,
        make_threshold_embeddings_hospital_app,
        make_threshold_embeddings_server_app,
    )


#: The built-in modes' protocols, by mode name (and key setup, where it changes the protocol).
_BUILTIN_APPS: dict[str, Callable[[], FederationApps]] = {
    "embeddings": _embeddings_apps,
    "embeddings/threshold": _threshold_embeddings_apps,
    "updates": _updates_apps,
}


def builtin_apps(mode: str, keys: str | None = None) -> FederationApps:
    """The protocol of built-in mode ``mode`` under ``keys`` (imported now: TenSEAL only for
    "embeddings" with a shared key)."""
    return _BUILTIN_APPS.get(f"{mode}/{keys}", _BUILTIN_APPS[mode])()


def run_federation(
    workspace: Path,
    settings: AggregatorSettings | UpdatesSettings,
    n_hospitals: int,
    backend: str = "flower",
    client_cpus: float = 1.0,
    on_step: Callable[[int], None] | None = None,
    ray_address: str | None = None,
    faults: Sequence[Fault] = (),
    apps: FederationApps | None = None,
) -> dict:
    """Returns what the aggregator recorded (bytes, rounds, exclusions); raises on failure.

    ``apps``: the mode's aggregator and Flower apps (:meth:`medfed.modes.Mode.federation_apps`);
    None: those of the built-in mode ``settings.mode`` names (no attribute: "embeddings"),
    imported only then (mode "updates" with threshold keys runs where TenSEAL is absent).
    ``settings`` is what the aggregator gets. ``faults`` (:mod:`medfed.fl.faults`:
    ``--inject``, and mode "updates"' ``--dropouts``) are a client-side mod of every
    hospital's ClientApp (its factory's ``mods=``), on either backend.
    """
    if apps is None:
        apps = builtin_apps(
            getattr(settings, "mode", "embeddings"), getattr(settings, "keys", None)
        )
    Aggregator, make_hospital_app, make_aggregator_app = apps
    client_app = make_hospital_app(workspace, mods=fault_mods(faults))
    if backend == "local":
        aggregator = Aggregator(settings, on_step=on_step)
        if settings.workers == 0:
            return aggregator.run(LocalGrid(client_app, n_hospitals))
        from medfed.scale.cluster import ray_session, resolve_address

        with ray_session(resolve_address(ray_address)):
            return aggregator.run(LocalGrid(client_app, n_hospitals))
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    _quiet_flower_deprecation()

    results: dict = {}
    server_app = make_aggregator_app(settings, results, on_step=on_step)
    from medfed.scale.cluster import ray_reports_to_file, resolve_address

    # "local": a private instance, never a cluster that `ray start` left on this machine
    init_args = {"address": "local", "num_cpus": os.cpu_count() or 2, "include_dashboard": False}
    address = resolve_address(ray_address)
    if address:  # Flower's simulation engine joins the running cluster
        init_args = {"address": address}
    init_args["log_to_driver"] = _forward_actor_output()
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0, **ACTOR_RECOVERY},
        "init_args": init_args,
    }
    with ray_reports_to_file(console=init_args["log_to_driver"]):
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
