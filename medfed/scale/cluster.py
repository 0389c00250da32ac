"""Which Ray to use, and a session that always shuts down what it started.

medfed's entry points run on a running Ray cluster when one is given, by ``--ray-address`` or
the ``RAY_ADDRESS`` environment variable (which ``ray job submit`` sets for the job's driver),
and otherwise start a private local Ray instance without a dashboard.

The address is the cluster's GCS address (``host:6379``, or ``auto`` on a cluster node), not
the dashboard / Jobs address (``http://host:8265``): that one is for ``ray job submit``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from medfed.errors import ConfigError

log = logging.getLogger(__name__)

ENV_ADDRESS = "RAY_ADDRESS"


class ClusterError(ConfigError):
    """A Ray address that cannot be used, or a cluster that cannot be reached."""


def resolve_address(
    cli_address: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """``--ray-address`` if given, else ``$RAY_ADDRESS``, else None (start a local Ray).

    Raises :class:`ClusterError` for a dashboard URL (``http://...``), which ``ray.init`` cannot
    connect to.
    """
    environ = os.environ if environ is None else environ
    source, address = "--ray-address", (cli_address or "").strip()
    if not address:
        source, address = ENV_ADDRESS, environ.get(ENV_ADDRESS, "").strip()
    if not address:
        return None
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{source}={address!r} is a dashboard / Jobs API address; give it to "
            f"`ray job submit --address {address}`. To run the driver here against the "
            "cluster, pass its GCS address instead (e.g. --ray-address 127.0.0.1:6379, or "
            "'auto' on a cluster node), or unset RAY_ADDRESS to use a local Ray."
        )
    return address


@dataclass(frozen=True)
class RayInfo:
    """What a :func:`ray_session` connected to."""

    address: str | None  # None: a private local instance started by this process
    gcs_address: str
    cpus: float

    def describe(self) -> str:
        """One line for logs: the cluster's GCS address or a local instance, and its CPUs."""
        where = f"cluster at {self.gcs_address}" if self.address else "local Ray instance"
        return f"{where} ({self.cpus:g} CPUs)"


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    log_to_driver: bool = False,
) -> Iterator[RayInfo]:
    """``ray.init(address=...)`` for a cluster, else a local ``ray.init`` without dashboard.

    Ray is always shut down on exit (normal, error or Ctrl-C) when this session started it. If
    Ray is already initialised in this process, the session uses it and leaves it running.
    ``num_cpus`` only applies to a local instance.
    """
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        yield RayInfo(address, ctx.gcs_address, ray.cluster_resources().get("CPU", 0.0))
        return
    kwargs: dict = {"log_to_driver": log_to_driver, "logging_level": logging.WARNING}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(
                f"could not connect to the Ray cluster at {address!r}: {e}. Is it running "
                f"(`ray status --address {address}`)? Unset RAY_ADDRESS or drop --ray-address "
                "to use a local Ray."
            ) from None
    else:  # "local": a new private instance, even if `ray start` left an address file behind
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    try:
        info = RayInfo(
            address,
            ray.get_runtime_context().gcs_address,
            ray.cluster_resources().get("CPU", 0.0),
        )
        log.info("Ray: %s", info.describe())
        yield info
    finally:
        ray.shutdown()
