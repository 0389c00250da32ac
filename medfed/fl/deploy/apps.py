"""The Flower apps a deployment runs (``[tool.flwr.app.components]`` of the app directory).

They are the simulation's apps, bound to their party's files when Flower calls them:

* :data:`client_app`: a hospital's SuperNode runs it for every message (one ``flwr-clientapp``
  process per message). The node's ``--node-config`` names its workspace, its
  ``partition-id``, the mode and, for robustness runs, its faults (``;``-separated
  ``--inject`` specs).
* :data:`server_app`: the aggregator, run by the SuperLink in its own ``flwr-serverapp``
  process. The run config's ``aggregator`` names its directory, which holds all it has:
  its settings (``settings.pkl``, public parameters only), its signing key and every party's
  pinned public key. It writes ``results.json`` there, and one byte to ``progress`` per step.

With the run config's ``audit`` true the ServerApp also lists every file it opens (Python's
``open`` audit events) in ``opened.json``, and after ``results.json`` waits for ``release``
(up to :data:`AUDIT_HOLD_SECONDS`) so that the operator can scan its memory for secrets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medfed.crypto.signing import AGGREGATOR, PinnedKeys, SigningKey
from medfed.fl.workspace import SIGNING_KEY

log = logging.getLogger(__name__)

SETTINGS = "settings.pkl"
PINNED = "pinned.json"
RESULTS = "results.json"
PROGRESS = "progress"
OPENED = "opened.json"
FINISHED = "finished"
RELEASE = "release"
AUDIT_HOLD_SECONDS = 300.0


@functools.lru_cache(maxsize=8)
def _hospital_app(workspace: str, mode: str, faults: str) -> ClientApp:
    from medfed.fl.faults import fault_mods, parse_faults
    from medfed.fl.launch import builtin_apps

    specs = [f for f in faults.split(";") if f]
    apps = builtin_apps(*mode.split("/", 1))  # "mode/keys" (or a bare mode)
    return apps.hospital_app(workspace, mods=fault_mods(parse_faults(specs)))


class NodeHospitalApp(ClientApp):
    """A hospital's ClientApp, built from its SuperNode's ``--node-config`` on first use."""

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, message: Message, context: Context) -> Message:
        """Handle one message with the hospital app of this node's workspace and mode."""
        cfg = context.node_config
        app = _hospital_app(str(cfg["workspace"]), str(cfg["mode"]), str(cfg.get("faults", "")))
        return app(message, context)


client_app = NodeHospitalApp()
server_app = ServerApp()


def aggregator_key(directory: Path) -> SigningKey:
    """The aggregator's signing key with every party's pinned public key, from its directory."""
    pinned = PinnedKeys.from_dict(json.loads((directory / PINNED).read_text()))
    return SigningKey(AGGREGATOR, (directory / SIGNING_KEY).read_bytes(), pinned)


class _OpenAudit:
    """Every path this process opens from now on (Python's ``open`` audit event)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.active = True
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and args and isinstance(args[0], str | bytes):
            self.paths.append(str(Path(args[0] if isinstance(args[0], str) else args[0].decode())))

    def write(self, path: Path) -> None:
        self.active = False  # audit hooks cannot be removed; this one stops recording
        path.write_text(json.dumps(sorted(set(self.paths))))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=_plain))
    tmp.replace(path)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in the aggregator's record, as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the aggregator of the mode its settings name, on this deployment's Grid."""
    from medfed.fl.launch import builtin_apps

    directory = Path(str(context.run_config["aggregator"]))
    audit = _OpenAudit() if bool(context.run_config.get("audit", False)) else None
    with open(directory / SETTINGS, "rb") as f:
        settings = pickle.load(f)  # written by the operator into the aggregator's own directory
    settings = dataclasses.replace(settings, signing=aggregator_key(directory))
    progress = open(directory / PROGRESS, "ab", buffering=0)  # noqa: SIM115 - closed below
    protocol = builtin_apps(
        getattr(settings, "mode", "embeddings"), getattr(settings, "keys", None)
    )
    aggregator = protocol.aggregator(settings, on_step=lambda step: progress.write(b"."))
    try:
        results = aggregator.run(grid)
    except Exception as e:  # noqa: BLE001 - reported to the operator, then raised
        _write_json(
            directory / RESULTS,
            {"error": f"{type(e).__name__}: {e}", "excluded": aggregator.ledger.excluded},
        )
        raise
    finally:
        progress.close()
        if audit is not None:
            audit.write(directory / OPENED)
    _write_json(directory / RESULTS, results)
    if audit is not None:
        (directory / FINISHED).write_text("1")
        deadline = time.monotonic() + AUDIT_HOLD_SECONDS
        while not (directory / RELEASE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
