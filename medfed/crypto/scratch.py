"""RAM-backed scratch files that TenSEAL's SEAL binding saves to and loads from.

The binding (de)serializes SEAL objects through file paths only. The files live in
``/dev/shm``, which is RAM: a named file there outlives a process that is killed (Ray kills its
actors, and no finalizer runs), and a Galois-key load leaves 26 MB behind per process. So each
file is unlinked as soon as it is created and reached through ``/proc/self/fd``: the kernel frees
it when the last descriptor closes, however the process ends. Where there is no
``/proc/self/fd`` (not Linux) the file keeps its name and :meth:`Scratch.close` removes it.
"""

from __future__ import annotations

import os
import tempfile


def shared_dir() -> str:
    """This node's RAM-backed directory, ``/dev/shm``, or the system temp dir without one.
    Processes on one node find each other's files here (:mod:`medfed.scale.node_claims`)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class Scratch:
    """One process's scratch file (a forked process must make its own: see :attr:`pid`)."""

    def __init__(self, kind: str) -> None:
        self.fd, named = tempfile.mkstemp(prefix=f"medfed-seal-{kind}-", dir=shared_dir())
        self.pid = os.getpid()
        anonymous = f"/proc/self/fd/{self.fd}"
        if os.path.exists(anonymous):
            os.unlink(named)
            self.path, self.named = anonymous, None
        else:
            self.path, self.named = named, named

    def write(self, data: bytes) -> None:
        """``data`` at the start of the file (longer earlier contents stay after it)."""
        os.pwrite(self.fd, data, 0)

    def read(self) -> bytes:
        """The whole file's current contents."""
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        """Close the file, which frees it (a named one is unlinked); no-op in a forked copy."""
        if self.fd < 0 or self.pid != os.getpid():  # a forked copy leaves the parent's alone
            return
        os.close(self.fd)
        self.fd = -1
        if self.named is not None:
            try:
                os.unlink(self.named)
            except FileNotFoundError:
                pass
