"""SEAL's scratch files live in RAM: none may outlive its process, however the process ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from medfed.crypto.scratch import Scratch, shared_dir


def _ours() -> set[str]:
    return {name for name in os.listdir(shared_dir()) if name.startswith("medfed-seal-")}


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_a_killed_process_leaves_no_scratch_file(params):
    """A process that loaded Galois keys (the largest scratch contents) and is then killed
    with SIGKILL, as Ray kills its actors, leaves no file behind."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from medfed.crypto.context import load_public_context, make_secret_context
        from medfed.crypto.context import public_context_bytes
        from medfed.crypto.params import get_preset
        from medfed.crypto.seal import SealEngine
        secret = make_secret_context(get_preset({params.name!r}))
        galois = SealEngine(secret).make_galois_keys([1, 2])
        engine = SealEngine(load_public_context(public_context_bytes(secret)), galois_keys=galois)
        engine.to_uncompressed_bytes(engine.encrypt([0.0] * engine.slots))
        print("loaded", len(galois), flush=True)
        time.sleep(60)
        """
    )
    before = _ours()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("loaded"), line
        assert int(line.split()[1]) > 0
        assert _ours() == before  # unlinked while the process is alive, too
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert _ours() == before


def test_scratch_round_trips_and_closes():
    scratch = Scratch("test")
    scratch.write(b"0123456789")
    scratch.write(b"abc")  # in place: the earlier, longer contents stay after it
    assert scratch.read() == b"abc3456789"
    scratch.close()
    assert scratch.fd == -1
    scratch.close()  # twice is fine
