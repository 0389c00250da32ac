"""Which Ray to use, and a session that always shuts down what it started.

medfed's entry points run on a running Ray cluster when one is given, by ``--ray-address`` or
the ``RAY_ADDRESS`` environment variable (which ``ray job submit`` sets for the job's driver),
and otherwise start a private local Ray instance without a dashboard.

The address is the cluster's GCS address (``host:6379``, or ``auto`` on a cluster node), not
the dashboard / Jobs address (``http://host:8265``): that one is for ``ray job submit``.

:func:`ray_reports_to_file` keeps what Ray and Flower report about dying processes (tracebacks,
the raylet's notices and native log lines) off the console, in a log file, and says where.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


#: The file, in Ray's session log directory, that :func:`ray_reports_to_file` writes.
REPORTS_FILE = "medfed-ray-reports.log"


def ray_logs_dir() -> Path | None:
    """This process's Ray session log directory (``/tmp/ray/session_.../logs``): each Ray
    process's output (``worker-*.err``: the hospitals' actors, native crash reports included),
    the raylet's and the GCS's logs. None when Ray is not running here."""
    try:
        import ray._private.worker as ray_worker  # no public API names the session directory

        node = ray_worker._global_node
        return Path(node.get_logs_dir_path()) if node is not None else None
    except (ImportError, AttributeError, OSError):  # pragma: no cover - depends on Ray
        return None


class RayReports(logging.Handler):
    """Collects error reports into :data:`REPORTS_FILE` in Ray's session log directory (a
    temporary directory when Ray is not up at the first report); at the first one, logs one
    line saying where the reports and Ray's logs are."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.path: Path | None = None
        self.count = 0
        self._file_lock = threading.Lock()

    def write(self, text: str) -> None:
        """Append ``text`` (one report) to the file."""
        with self._file_lock:
            first = self.path is None
            if first:
                logs = ray_logs_dir()
                if logs is None or not logs.is_dir():
                    logs = Path(tempfile.mkdtemp(prefix="medfed-ray-"))
                self.path = logs / REPORTS_FILE
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text.rstrip("\n") + "\n")
            self.count += 1
        if first:  # said once, before anything else happens (a dead raylet ends the process)
            log.warning("%s", self.where())

    def emit(self, record: logging.LogRecord) -> None:
        """Write a log record (Flower's ``flwr`` logger at ERROR)."""
        try:
            self.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)

    def where(self) -> str:
        """One line: where the reports and Ray's own logs are."""
        return (
            "a hospital's Ray process failed; Ray's and Flower's reports are in "
            f"{self.path}, and each Ray process's output (native crash reports too) in "
            f"{self.path.parent if self.path else '?'}"
        )


@contextmanager
def ray_reports_to_file(console: bool = False) -> Iterator[RayReports]:
    """Route Ray's and Flower's reports of failing processes to a file while the block runs;
    the first report logs one line saying where they are.

    What reaches a medfed console when a hospital's Ray actor dies: Flower's ``flwr`` ERROR
    records, each with a Python traceback through Ray's internals, and the raylet's notices,
    which Ray's driver prints to stdout (``(raylet) A worker died ...``; when the raylet itself
    dies, its last 20 native log lines). Both go to the :class:`RayReports` file instead, with
    the aggregator's one-line exclusion on the console. What the actors print themselves
    (e.g. the ``*** SIGSEGV received ... PC: @`` backtrace of a crashing process) stays in
    Ray's ``worker-*.err`` files as long as ``log_to_driver`` is off (see
    :func:`medfed.fl.launch.run_federation`). ``console=True`` (``-v``) keeps both on the
    console too.
    """
    reports = RayReports()
    flwr = logging.getLogger("flwr")
    propagate = flwr.propagate
    flwr.addHandler(reports)
    flwr.propagate = propagate and console
    restore = _raylet_notices_to(reports, console)
    try:
        yield reports
    finally:
        restore()
        flwr.removeHandler(reports)
        flwr.propagate = propagate


def _intended_exit(line: str) -> bool:
    """A raylet notice about an actor that exited because it was told to (Flower stopping
    its ClientApp actors at the end of a run), not a failure."""
    return "IntentionalSystemExit" in line and "exit_actor()" in line


def _raylet_notices_to(reports: RayReports, console: bool):
    """Send what Ray's driver prints for the raylet (``pid`` "raylet": worker deaths, a dead
    raylet's log tail) to ``reports`` as well; returns the function that undoes it.

    Ray prints them from its error-listener thread through
    ``ray._private.worker.print_to_stdstream``, a private function with no switch (unlike
    the actors' output, ``log_to_driver``); it is wrapped for the run, and left alone when
    this Ray has no such function.
    """
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # pragma: no cover - Ray is a dependency
        return lambda: None
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:  # pragma: no cover - another Ray version
        return lambda: None

    def print_to_stdstream(data, *args, **kwargs):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            if all(_intended_exit(str(line)) for line in data.get("lines", [])):
                return original(data, *args, **kwargs) if console else None
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            reports.write(f"{stamp} raylet: " + "\n".join(map(str, data.get("lines", []))))
            if not console:
                return None
        return original(data, *args, **kwargs)

    ray_worker.print_to_stdstream = print_to_stdstream

    def restore() -> None:
        if ray_worker.print_to_stdstream is print_to_stdstream:
            ray_worker.print_to_stdstream = original

    return restore
