"""Against a real local Ray cluster: ``ray start --head`` on 127.0.0.1, jobs, then teardown.

The cluster gets its own ``--temp-dir``, free ports and its own session (process group).
Teardown never runs ``ray stop`` (that stops every Ray instance on the machine): it signals
the ``ray start --block`` process it started, then kills only what is left of that process
group and any process whose command line names the cluster's temp dir.

``ray job submit`` needs the dashboard's Jobs API (``pip install "ray[default]"``); without it
the job tests are skipped and the driver test (``--ray-address``) still runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray_cluster

REPO = Path(__file__).resolve().parents[1]
HAS_JOBS_API = all(importlib.util.find_spec(m) for m in ("aiohttp", "aiohttp_cors", "opencensus"))
needs_jobs_api = pytest.mark.skipif(
    not HAS_JOBS_API, reason='ray job submit needs the dashboard: pip install "ray[default]"'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _cluster_env() -> dict[str, str]:
    # Ray replaces 127.0.0.1 by the machine's routable IP unless "cluster mode" is off; off,
    # every component (GCS, raylet, dashboard, drivers) uses 127.0.0.1.
    return {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def _our_stragglers(pgid: int, marker: str) -> list[int]:
    """Live PIDs in our process group or whose command line names our temp dir (Linux /proc)."""
    pids = []
    if not os.path.isdir("/proc"):
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie: already dead, waiting for its parent
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            in_group = os.getpgid(pid) == pgid
        except (OSError, ValueError, IndexError):
            continue
        if in_group or marker in cmdline:
            pids.append(pid)
    return pids


class Cluster:
    def __init__(self, temp_dir: str, dashboard: bool) -> None:
        self.temp_dir = temp_dir
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}" if dashboard else None
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": _free_port(),
            "--node-manager-port": _free_port(),
            "--object-manager-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
            "--metrics-export-port": _free_port(),
        }
        self.cmd = [
            *_ray_cli(),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true" if dashboard else "false",
            "--dashboard-host",
            "127.0.0.1",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            *(x for k, v in ports.items() for x in (k, str(v))),
        ]
        self.log = Path(temp_dir) / "ray-start.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_cluster_env(),
                start_new_session=True,  # our own process group: teardown kills only it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{self.log.read_text()[-3000:]}")
            if self._ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster did not come up:\n{self.log.read_text()[-3000:]}")

    def _ready(self) -> bool:
        if "Ray runtime started" not in self.log.read_text():
            return False
        if self.dashboard_url is None:
            return True
        from ray.job_submission import JobSubmissionClient

        try:
            JobSubmissionClient(self.dashboard_url).list_jobs()
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block stops its processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in _our_stragglers(pgid, self.temp_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="medfed-ray-")  # short: Ray's socket paths must fit
    c = Cluster(temp_dir, dashboard=HAS_JOBS_API)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not _our_stragglers(c.proc.pid, temp_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MedMNIST-layout npz, a 2-cell sweep over it, and a shared feature cache."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in (("train", 60), ("val", 10), ("test", 30)):
        y = rng.integers(0, 2, (n, 1)).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] += 150
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = x, y
    data = root / "toy.npz"
    np.savez(data, **arrays)
    sweep = root / "sweep_tiny.yaml"
    sweep.write_text(
        f"name: tiny\nbase:\n  dataset: {data}\n  img_size: 32\n  epochs: 1\n  hospitals: 2\n"
        f"  backend: local\n  cache_dir: {root / 'cache'}\ngrid:\n  sigmoid_degree: [1, 3]\n"
    )
    return {"root": root, "data": data, "sweep": sweep}


def _check_sweep(out: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert len(records) == 2
    assert [r["status"] for r in records] == ["done", "done"], [r["error"] for r in records]
    for r in records:
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
        assert r["metrics"]["hospitals"] == 2 and r["metrics"]["bytes_up"] > 0
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert (out / "report.md").is_file()
    assert (out / "plots" / "accuracy_vs_sigmoid_degree.png").is_file()


def _submit(cluster: Cluster, out: Path, *args: str) -> subprocess.CompletedProcess:
    """simulations/submit_ray_job.sh ARGS: the documented `ray job submit` commands."""
    env = {
        **_cluster_env(),
        "RAY_API_SERVER_ADDRESS": cluster.dashboard_url,
        "OUT": str(out),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return subprocess.run(
        ["bash", str(REPO / "simulations" / "submit_ray_job.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )


@needs_jobs_api
def test_sweep_submitted_with_ray_job_submit_runs_on_the_cluster(cluster, tiny):
    jobs_out = tiny["root"] / "jobs"
    r = _submit(cluster, jobs_out, "sweep", str(tiny["sweep"]))
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    assert f"Ray tasks on cluster at {cluster.address}" in logs  # not a private local Ray
    _check_sweep(jobs_out / "sweep_tiny")
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(cluster.dashboard_url).list_jobs()
    assert any(j.status == JobStatus.SUCCEEDED and "medfed.sweep" in j.entrypoint for j in jobs)


@needs_jobs_api
def test_simulate_submitted_with_ray_job_submit_writes_its_results(cluster, tiny):
    jobs_out = tiny["root"] / "jobs"
    r = _submit(
        cluster, jobs_out, "run", "--dataset", str(tiny["data"]), "--img-size", "32",
        "--epochs", "1", "--hospitals", "2", "--cache-dir", str(tiny["root"] / "cache"),
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    metrics = json.loads((jobs_out / "run" / "metrics.json").read_text())
    assert metrics["hospitals"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0


def test_sweep_driver_connects_with_ray_address(cluster, tiny):
    out = tiny["root"] / "driver-sweep"
    env = {k: v for k, v in _cluster_env().items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [sys.executable, "-m", "medfed.sweep", str(tiny["sweep"]), "--out", str(out),
         "--ray-address", cluster.address, "--no-progress"],
        capture_output=True, text=True, env=env, timeout=400, cwd=REPO,
    )  # fmt: skip
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-4000:]
    assert f"Ray tasks on cluster at {cluster.address}" in logs
    _check_sweep(out)
    # a rerun into the same directory skips every cell and never needs the cluster
    r = subprocess.run(
        [sys.executable, "-m", "medfed.sweep", str(tiny["sweep"]), "--out", str(out),
         "--ray-address", "127.0.0.1:1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0 and "2 skipped" in r.stdout, r.stdout + r.stderr
