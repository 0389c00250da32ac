"""The deployment's OS processes: start them with their own logs, find their children, and
stop every one of them by PID.

Flower's SuperLink and SuperNodes start ``flower-superexec`` children, which start
``flwr-serverapp`` / ``flwr-clientapp`` processes; :meth:`Processes.stop` takes a snapshot
of the whole tree before it signals anything, so nothing is orphaned, and ends only those PIDs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_map() -> dict[int, list[int]]:
    """Every live process's children, from ``/proc``."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                out.setdefault(parent, []).append(int(entry.name))
    return out


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """``pid`` and every process below it."""
    tree = children_map() if tree is None else tree
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def started_at(pid: int) -> int | None:
    """``pid``'s start time (clock ticks since boot): with the PID, names one process even if
    the PID is reused later; None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(pid: int, since: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not), and is the process started at ``since``."""
    at = started_at(pid)
    return at is not None and (since is None or at == since)


def command_line(pid: int) -> str:
    """``pid``'s command line ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Processes:
    """The processes one deployment started, each with its log file in ``logs``."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, cmd: Sequence[str], cwd: Path, env: dict | None = None):
        """Start ``cmd`` in ``cwd``, output to ``logs/<name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                list(cmd),
                cwd=cwd,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches only the operator
            )
        self.started.append(proc)
        return proc

    def tree(self) -> list[int]:
        """Every live PID below the started processes (them included)."""
        tree = children_map()
        return [p for proc in self.started for p in descendants(proc.pid, tree)]

    def find(self, needle: str) -> list[int]:
        """Live PIDs below the started processes whose command line contains ``needle``."""
        return [p for p in self.tree() if needle in command_line(p)]

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every process of the trees (snapshot first), then SIGKILL what is left;
        returns the PIDs still alive afterwards (none, unless the kernel refuses)."""
        snapshot = {p: started_at(p) for p in self.tree()}
        pids = {p: at for p, at in snapshot.items() if at is not None}
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(alive(p, at) for p, at in pids.items()):
                time.sleep(0.1)
            for p in [p for p, at in pids.items() if alive(p, at)]:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
        return sorted(p for p, at in pids.items() if alive(p, at))
