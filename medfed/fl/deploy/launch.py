"""A local deployment: the same federation as real, separate parties on 127.0.0.1.

:func:`run_deployment` takes a workspace whose ``hospital_<i>`` directories hold each
hospital's data partition and provisioning (``meta.json``), and then:

1. Every party provisions itself in its own process (:mod:`.provision`): its signing,
   channel and (hospitals) SuperNode authentication keys; the operator publishes the public
   halves and pins them (run id + Ed25519 keys) into each party's configuration. With a shared
   key, the lead hospital makes the CKKS key and seals it to each other hospital, which opens
   it in its own process. The aggregator's directory gets its settings (public parameters).
2. A SuperLink (TLS with a locally made CA, SuperNode authentication on), one SuperNode per
   hospital (registered public key, own Flower home, ``--node-config`` naming its workspace
   and partition) and, through ``flwr run``, the ServerApp: separate OS processes.
3. The ServerApp's open files are sampled from outside for its whole life; with ``audit`` it
   also lists what it opened itself and holds at the end while the operator scans its memory
   for the hospitals' secrets (:mod:`.audit`).
4. Every process started is stopped by PID, also on failure.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import medfed
from medfed.fl.deploy import apps as A
from medfed.fl.deploy.audit import FdSampler, scan_memory, secret_patterns
from medfed.fl.deploy.pki import make_tls
from medfed.fl.deploy.processes import Processes
from medfed.fl.deploy.provision import NODE_AUTH_KEY, PUBLIC
from medfed.fl.messages import FederationError
from medfed.fl.workspace import META, hospital_dir

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION = "medfed-local"
#: Seconds each start-up phase may take before the deployment gives up with the log to read.
START_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """A console script of Flower's: beside this Python (its environment), else on PATH (a
    virtual environment that uses the system's site-packages)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name} is not beside {sys.executable} nor on PATH: install flwr")
    return found


class _Flower:
    """The Flower CLIs' flags for this environment's flwr: 1.41 serves every SuperLink API over
    HTTPS on one port; 1.30 (the Python 3.10 threshold environment) has one gRPC port per API
    and names a SuperNode's ClientAppIo address instead of its host and port."""

    def __init__(self) -> None:
        import importlib.metadata

        version = importlib.metadata.version("flwr")
        self.http = tuple(int(v) for v in version.split(".")[:2]) >= (1, 41)
        self.ports = [_free_port() for _ in range(1 if self.http else 3)]

    @property
    def control(self) -> str:
        """The address ``flwr`` talks to."""
        return f"{HOST}:{self.ports[0] if self.http else self.ports[2]}"

    @property
    def fleet(self) -> str:
        """The address SuperNodes connect to."""
        return f"{HOST}:{self.ports[0] if self.http else self.ports[1]}"

    def superlink(self) -> list[str]:
        """The SuperLink's address flags."""
        if self.http:
            return ["--host", HOST, "--port", str(self.ports[0])]
        serverappio, fleet, control = (f"{HOST}:{p}" for p in self.ports)
        return [
            *("--serverappio-api-address", serverappio),
            *("--fleet-api-address", fleet),
            *("--control-api-address", control),
        ]

    def supernode(self, auth_key: Path, auth_public: Path) -> list[str]:
        """A SuperNode's authentication and address flags."""
        port = str(_free_port())
        if self.http:
            return ["--auth-supernode-private-key", str(auth_key), "--host", HOST, "--port", port]
        return [
            *("--auth-supernode-private-key", str(auth_key)),
            *("--auth-supernode-public-key", str(auth_public)),
            *("--clientappio-api-address", f"{HOST}:{port}"),
        ]

    def register(self, public: Path, name: str) -> list[str]:
        """``flwr``'s arguments that register a SuperNode's public key."""
        named = ["--name", name] if self.http else []
        return ["supernode", "register", str(public), CONNECTION, *named]


def _provision(steps: list[list[str]], env: dict[str, str], what: str) -> None:
    """Run provisioning steps as parallel processes; raise with the first failure's output."""
    cmd = [sys.executable, "-m", "medfed.fl.deploy.provision"]
    procs = [
        subprocess.Popen([*cmd, *s], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for s in steps
    ]
    for step, proc in zip(steps, procs, strict=True):
        out, _ = proc.communicate()
        if proc.returncode:
            tail = out.decode(errors="replace").strip().splitlines()[-5:]
            raise FederationError(f"{what} failed for {step[1]}: {' | '.join(tail)}")


class _Party:
    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.name = directory, name

    @property
    def public(self) -> dict[str, str]:
        return json.loads((self.dir / PUBLIC).read_text())


def provision_parties(
    workspace: Path, names: Sequence[str], shared_key: str | None, run_id: str, env: dict
) -> tuple[list[_Party], _Party]:
    """Step 1: each party's own keys, the pinned public keys, the sealed shared key."""
    from medfed.crypto.signing import PinnedKeys

    hospitals = [_Party(hospital_dir(workspace, i), n) for i, n in enumerate(names)]
    aggregator = _Party(workspace / "aggregator", "aggregator")
    steps = [["identity", str(h.dir), h.name, "--node-auth"] for h in hospitals]
    _provision([*steps, ["identity", str(aggregator.dir), "aggregator"]], env, "identity")
    public = workspace / "public"
    public.mkdir(exist_ok=True)
    for party in (*hospitals, aggregator):
        (public / f"{party.name}.json").write_text(json.dumps(party.public))
    pinned = PinnedKeys(
        run_id,
        bytes.fromhex(aggregator.public["signing"]),
        {h.name: bytes.fromhex(h.public["signing"]) for h in hospitals},
    ).to_dict()
    for h in hospitals:
        meta = json.loads((h.dir / META).read_text())
        (h.dir / META).write_text(json.dumps({**meta, "pinned": pinned}))
    (aggregator.dir / A.PINNED).write_text(json.dumps(pinned))
    if shared_key is not None:
        lead, others = hospitals[0], hospitals[1:]
        common = ["--run-id", run_id, "--public", str(public), "--mailbox", str(public / "sealed")]
        _provision(
            [
                [
                    "share-key",
                    str(lead.dir),
                    lead.name,
                    *common,
                    "--ckks",
                    shared_key,
                    "--to",
                    *(h.name for h in others),
                ]
            ],
            env,
            "making the shared key",
        )
        steps = [["receive-key", str(h.dir), h.name, *common, "--lead", lead.name] for h in others]
        if steps:
            _provision(steps, env, "receiving the shared key")
    return hospitals, aggregator


def _app_dir(directory: Path, aggregator: Path, audit: bool) -> Path:
    """The Flower app directory ``flwr run`` bundles: components and run config only (the
    code is the installed medfed)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "medfed-federation"
version = "1.0.0"
description = "medfed's federation, as Flower apps"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medfed"

[tool.flwr.app.components]
serverapp = "medfed.fl.deploy.apps:server_app"
clientapp = "medfed.fl.deploy.apps:client_app"

[tool.flwr.app.config]
aggregator = {json.dumps(str(aggregator))}
audit = {"true" if audit else "false"}
"""
    )
    return directory


def _wait(what: str, ready: Callable[[], bool], log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    raise FederationError(f"{what} did not come up within {timeout:.0f} s; see {log_file}")


def pub_path(party: _Party) -> Path:
    """Where a hospital's SuperNode public key is published (OpenSSH format)."""
    return party.dir / "supernode_auth.pub"


class _Deployment:
    """One deployment's processes and the operator's view of them (see the module docstring)."""

    def __init__(self, workspace: Path, logs: Path, env: dict[str, str]) -> None:
        self.workspace, self.logs = workspace, logs
        self.tls = make_tls(workspace / "superlink")
        self.flower = _Flower()
        operator = workspace / "operator"  # the operator's `flwr` configuration
        operator.mkdir(exist_ok=True)
        (operator / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.flower.control}"\n'
            f"root-certificates = {json.dumps(str(self.tls.ca_certificate))}\n"
        )
        self.flwr_env = {**env, "FLWR_HOME": str(operator)}
        self.processes = Processes(logs, env)
        self.sampler: FdSampler | None = None

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_tool("flwr"), *args],
            env=self.flwr_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _nodes(self) -> str | None:
        """``flwr supernode ls`` as JSON, or None while the SuperLink does not answer."""
        done = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        return done.stdout if done.returncode == 0 else None

    def start_superlink(self, hospitals: list[_Party]) -> None:
        """The SuperLink (TLS, SuperNode authentication), then each hospital's node key."""
        tls = self.tls
        self.processes.start(
            "superlink",
            [
                _tool("flower-superlink"),
                *("--ssl-ca-certfile", str(tls.ca_certificate)),
                *("--ssl-certfile", str(tls.certificate)),
                *("--ssl-keyfile", str(tls.private_key)),
                "--enable-supernode-auth",
                *self.flower.superlink(),
            ],
            cwd=self.workspace / "superlink",
            env={"FLWR_HOME": str(self.workspace / "superlink" / "flwr")},
        )
        ready = lambda: self._nodes() is not None  # noqa: E731
        _wait("the SuperLink", ready, self.logs / "superlink.log", START_TIMEOUT)
        for h in hospitals:
            pub = pub_path(h)
            pub.write_text(h.public["node_auth"])
            done = self._flwr(*self.flower.register(pub, h.name), timeout=START_TIMEOUT)
            if done.returncode:
                raise FederationError(f"registering {h.name}'s SuperNode failed: {done.stdout}")

    def start_supernodes(self, hospitals: list[_Party], mode: str, faults: Sequence[Any]) -> None:
        """One SuperNode per hospital, its node config naming its workspace and partition;
        returns once all are online."""
        specs: dict[int, list[str]] = {}
        for fault in faults:
            specs.setdefault(fault.hospital, []).append(str(fault))
        for i, h in enumerate(hospitals):
            config = (
                f"partition-id={i} num-partitions={len(hospitals)} "
                f"workspace={json.dumps(str(self.workspace))} mode={json.dumps(mode)} "
                f"faults={json.dumps(';'.join(specs.get(i, [])))}"
            )
            self.processes.start(
                f"supernode-{i}",
                [
                    _tool("flower-supernode"),
                    *("--superlink", self.flower.fleet),
                    *("--root-certificates", str(self.tls.ca_certificate)),
                    *("--node-config", config),
                    *self.flower.supernode(h.dir / NODE_AUTH_KEY, pub_path(h)),
                ],
                cwd=h.dir,
                env={"FLWR_HOME": str(h.dir / "flwr")},
            )
        online = lambda: (self._nodes() or "").count('"online"') >= len(hospitals)  # noqa: E731
        _wait("the SuperNodes", online, self.logs / "supernode-0.log", START_TIMEOUT)

    def run_app(
        self,
        aggregator: _Party,
        n_hospitals: int,
        audit: bool,
        on_step: Callable[[int], None] | None,
    ) -> tuple[dict, dict[str, Any]]:
        """``flwr run`` the apps; relay the aggregator's progress, scan its memory when it
        holds (``audit``); returns its results and the memory scan."""
        app = _app_dir(self.workspace / "app", aggregator.dir, audit)
        self.sampler = FdSampler(lambda: self.processes.find("flwr-serverapp"))
        log_file = self.logs / "flwr-run.log"
        with open(log_file, "wb") as out:
            run = subprocess.Popen(
                [_tool("flwr"), "run", str(app), CONNECTION, "--stream"],
                env=self.flwr_env,
                cwd=self.workspace,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        steps, memory = 0, {}
        progress = aggregator.dir / A.PROGRESS
        while run.poll() is None:
            time.sleep(0.2)
            done = progress.stat().st_size if progress.exists() else 0
            while steps < done:
                steps += 1
                if on_step is not None:
                    on_step(steps)
            if audit and not memory and (aggregator.dir / A.FINISHED).exists():
                memory = _scan(self.processes, secret_patterns(self.workspace, n_hospitals))
                (aggregator.dir / A.RELEASE).write_text("1")
        self.sampler.stop()
        if run.returncode:
            log.warning("flwr run exited with %s; see %s", run.returncode, log_file)
        results_file = aggregator.dir / A.RESULTS
        if not results_file.exists():
            raise FederationError(
                f"the ServerApp wrote no results; see {log_file} and {self.logs / 'superlink.log'}"
            )
        return json.loads(results_file.read_text()), ({"memory": memory} if memory else {})


def run_deployment(
    workspace: Path,
    settings: Any,
    names: Sequence[str],
    *,
    mode: str,
    shared_key: str | None,
    faults: Sequence[Any] = (),
    on_step: Callable[[int], None] | None = None,
    logs: Path | None = None,
    audit: bool = False,
) -> dict:
    """Run one federation as a local deployment; returns the aggregator's record, with a
    ``deployment`` entry (phase times, processes, separation evidence). Raises
    :class:`~medfed.fl.messages.FederationError` on failure, after stopping every process.

    ``names``: the hospitals, whose data and ``meta.json`` are already in
    ``workspace/hospital_<i>``. ``shared_key``: the CKKS preset of the lead hospital's shared
    key (None: the protocol makes its keys itself, or there are none). ``logs``: where each
    process's log goes (default ``workspace/logs``).
    """
    import secrets

    workspace = Path(workspace)
    logs = Path(logs) if logs is not None else workspace / "logs"
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # the parties run this medfed, installed or not (a source checkout)
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(medfed.__file__).parent.parent), os.environ.get("PYTHONPATH")) if p
        ),
    }
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    run_id = f"run-{secrets.token_hex(16)}"
    hospitals, aggregator = provision_parties(workspace, names, shared_key, run_id, env)
    with open(aggregator.dir / A.SETTINGS, "wb") as f:
        pickle.dump(replace(settings, signing=None), f)
    phases["provision"] = time.perf_counter() - t0

    deployment = _Deployment(workspace, logs, env)
    try:
        t0 = time.perf_counter()
        deployment.start_superlink(hospitals)
        phases["superlink"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        deployment.start_supernodes(hospitals, mode, faults)
        phases["supernodes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results, separation = deployment.run_app(aggregator, len(hospitals), audit, on_step)
        phases["run"] = time.perf_counter() - t0
    finally:
        if deployment.sampler is not None:
            deployment.sampler.stop()
        t0 = time.perf_counter()
        left = deployment.processes.stop()
        phases["stop"] = time.perf_counter() - t0
        if left:
            log.warning("processes %s did not stop", left)
    if "error" in results:
        raise FederationError(f"the federation failed: {results['error']}")
    sampler = deployment.sampler
    separation.update(_separation(workspace, hospitals, aggregator, sampler, audit))
    results["deployment"] = {
        "seconds": {k: round(v, 2) for k, v in phases.items()},
        "processes": {
            "superlink": 1,
            "supernodes": len(hospitals),
            "serverapp_pids": sorted(sampler.pids),
        },
        "tls": True,
        "supernode_auth": True,
        "left_running": left,
        "separation": separation,
    }
    return results


def _scan(processes: Processes, patterns: dict[str, bytes]) -> dict[str, Any]:
    """Scan the ServerApp's memory for the hospitals' secrets (while it holds at the end)."""
    pids = processes.find("flwr-serverapp")
    found: dict[str, bool] = {}
    for pid in pids:
        for label, hit in scan_memory(pid, patterns).items():
            found[label] = found.get(label, False) or hit
    return {
        "pids": pids,
        "patterns": len(patterns),
        "found": sorted(label for label, hit in found.items() if hit),
    }


def _separation(
    workspace: Path, hospitals: list[_Party], aggregator: _Party, sampler, audit: bool
) -> dict[str, Any]:
    """Which files the ServerApp had open (sampled) or opened (its own audit), and whether
    any belongs to a hospital."""
    from medfed.fl.ciphers.threshold.at_rest import KEYRING

    private = [str(h.dir.resolve()) for h in hospitals] + [str((workspace / KEYRING).resolve())]
    sampled = sorted(p for p in sampler.paths if p.startswith("/"))
    out: dict[str, Any] = {
        "fd_samples": sampler.samples,
        "files_seen_open": len(sampled),
        "hospital_files_seen_open": [p for p in sampled if p.startswith(tuple(private))],
    }
    opened_file = aggregator.dir / A.OPENED
    if audit and opened_file.exists():
        opened = json.loads(opened_file.read_text())
        resolved = [str(Path(p).resolve()) for p in opened]
        out["files_opened"] = len(opened)
        out["hospital_files_opened"] = [p for p in resolved if p.startswith(tuple(private))]
        out["own_files_opened"] = sorted(
            {Path(p).name for p in resolved if p.startswith(str(aggregator.dir.resolve()))}
        )
    return out
