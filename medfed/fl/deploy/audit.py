"""Evidence that the aggregator's process holds no hospital secret, gathered from outside it.

* :class:`FdSampler`: every few milliseconds, the files the ServerApp process has open
  (``/proc/<pid>/fd``), over its whole life.
* :func:`scan_memory`: every readable mapping of a process (``/proc/<pid>/maps`` and
  ``/proc/<pid>/mem``; the operator is its ancestor, so the kernel allows the read) searched
  for byte patterns.
* :func:`secret_patterns`: the patterns that would betray a hospital's secret: windows of its
  CKKS secret key as serialized in its secret context and as SEAL holds it in memory (NTT
  residues, the bytes any process that loaded the key has), and its raw signing and channel
  keys. (Windows of the whole secret-context file would also match its public keys, which the
  aggregator holds by right.)

The operator (the test bench that provisioned the hospitals) reads the hospitals' files to
build the patterns; the aggregator's process is only observed.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

#: Bytes per pattern window; 2^-512 is the chance that random memory matches one by accident.
WINDOW = 64
_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4})")
_CHUNK = 1 << 26


class FdSampler:
    """Samples the open files of the processes ``find()`` returns until :meth:`stop`."""

    def __init__(self, find, interval: float = 0.02) -> None:
        self.find = find
        self.interval = interval
        self.paths: set[str] = set()
        self.pids: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        current: list[int] = []
        while not self._stop.wait(self.interval):
            current = [p for p in current if os.path.exists(f"/proc/{p}")] or self.find()
            for pid in current:
                self.pids.add(pid)
                self.samples += 1
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        self.paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    except OSError:
                        pass

    def stop(self) -> None:
        """Stop sampling (the recorded paths stay)."""
        self._stop.set()
        self._thread.join(timeout=5)


def scan_memory(pid: int, patterns: dict[str, bytes]) -> dict[str, bool]:
    """Which of ``patterns`` occur anywhere in ``pid``'s readable memory.

    Raises :class:`PermissionError` if the kernel refuses the read (not an ancestor, or
    ``ptrace_scope`` forbids it): an unreadable process proves nothing.
    """
    found = {label: False for label in patterns}
    overlap = max(len(p) for p in patterns.values()) - 1
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = _MAPS.match(line)
        if m and m.group(3)[0] == "r":
            regions.append((int(m.group(1), 16), int(m.group(2), 16)))
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    read = 0
    try:
        for start, end in regions:
            tail = b""
            for at in range(start, end, _CHUNK):
                try:
                    data = os.pread(fd, min(_CHUNK, end - at), at)
                except OSError:
                    break  # e.g. a guard page: the rest of this region is unreadable
                read += len(data)
                block = tail + data
                for label, pattern in patterns.items():
                    if not found[label] and pattern in block:
                        found[label] = True
                tail = block[-overlap:] if overlap else b""
    finally:
        os.close(fd)
    if read == 0:
        raise PermissionError(f"could not read any memory of process {pid}")
    return found


def _windows(data: bytes, label: str, count: int = 3) -> dict[str, bytes]:
    """``count`` windows spread over ``data`` (past any header)."""
    if len(data) < WINDOW * (count + 1):
        return {f"{label}": data} if data else {}
    step = len(data) // (count + 1)
    return {f"{label}[{k}]": data[k * step : k * step + WINDOW] for k in range(1, count + 1)}


def secret_key_patterns(secret_context: bytes, label: str) -> dict[str, bytes]:
    """Windows of a secret CKKS context's secret key: as serialized (a part of the file, which
    also holds public keys that the aggregator has by right) and as SEAL keeps it in memory
    (NTT residues, uint64 words: what any process that loaded the key holds)."""
    import tempfile

    import numpy as np
    import tenseal.sealapi as sa

    from medfed.crypto.context import load_secret_context
    from medfed.crypto.seal import SealEngine

    ctx = load_secret_context(secret_context)
    with tempfile.TemporaryDirectory() as tmp:  # SEAL's binding saves and loads by path
        path = Path(tmp) / "sk"
        ctx.secret_key().data.save(str(path))
        stored = path.read_bytes()
        key = sa.SecretKey()
        key.load(SealEngine(ctx).sc, str(path))
    words = key.data().dyn_array()
    start = words.size() // 2
    resident = np.array([words[start + k] for k in range(WINDOW // 8)], np.uint64).tobytes()
    return {**_windows(stored, f"{label} (stored)"), f"{label} (in memory)": resident}


def secret_patterns(workspace: Path, n_hospitals: int) -> dict[str, bytes]:
    """What of each hospital's secrets would show in a process that had them: its CKKS key
    (shared key), its threshold key share, Shamir shares held and at-rest key (threshold keys),
    its signing and channel keys."""
    from medfed.fl.ciphers.threshold import at_rest
    from medfed.fl.ciphers.threshold.hospital import stored_secrets
    from medfed.fl.deploy.provision import CHANNEL_IDENTITY
    from medfed.fl.workspace import SECRET_CONTEXT, SIGNING_KEY, hospital_dir

    out: dict[str, bytes] = {}
    for i in range(n_hospitals):
        d = hospital_dir(workspace, i)
        for label, blob in stored_secrets(workspace, i).items():
            out.update(_windows(blob, f"{d.name}/threshold {label}", count=2))
        if at_rest.key_path(workspace, i).exists():
            out[f"{d.name}/at-rest key"] = at_rest.key_path(workspace, i).read_bytes()
        secret = d / SECRET_CONTEXT
        if secret.exists():
            out.update(secret_key_patterns(secret.read_bytes(), f"{d.name}/secret key"))
        for name in (SIGNING_KEY, CHANNEL_IDENTITY):
            if (d / name).exists():
                raw = (d / name).read_bytes()
                for k in range(0, len(raw), 32):
                    out[f"{d.name}/{name}[{k // 32}]"] = raw[k : k + 32]
    return out
