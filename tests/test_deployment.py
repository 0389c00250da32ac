"""The local Flower deployment: credentials, each party's own provisioning, process control,
the separation evidence, and (marker ``deployment``) real 3-hospital deployments against the
in-process run of the same federation."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import medfed
from medfed.crypto.channel import ChannelError, Identity
from medfed.crypto.context import make_secret_context, public_context_bytes, secret_context_bytes
from medfed.crypto.params import PRESETS
from medfed.fl.deploy import pki
from medfed.fl.deploy.audit import scan_memory, secret_key_patterns, secret_patterns
from medfed.fl.deploy.processes import Processes, alive
from medfed.fl.deploy.provision import make_identity, receive_key, share_key
from medfed.fl.workspace import SECRET_CONTEXT
from tests.conftest import synthetic_hospitals


def test_tls_server_certificate_is_issued_by_the_ca_for_the_loopback_address(tmp_path):
    files = pki.make_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) <= pki.VALIDITY
    assert files.private_key.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in files.ca_certificate.parent.iterdir()) == [
        "ca.crt",
        "server.key",
        "server.pem",
    ]  # the CA's private key was never written


def test_node_auth_key_is_openssh_p384(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    public = pki.make_node_auth_key(tmp_path / "node")
    key = load_ssh_private_key((tmp_path / "node").read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP384R1) and public.startswith(b"ecdsa-sha2-nistp384 ")


def test_identity_round_trips_and_refuses_malformed_bytes():
    ident = Identity.generate()
    again = Identity.from_private_bytes(ident.private_bytes())
    assert again.public_bundle() == ident.public_bundle()
    with pytest.raises(ChannelError, match="64 bytes"):
        Identity.from_private_bytes(b"short")


def test_the_lead_seals_the_shared_key_to_each_hospital_only(tmp_path):
    public, mailbox = tmp_path / "public", tmp_path / "mailbox"
    public.mkdir()
    dirs = {n: tmp_path / n for n in ("h0", "h1", "h2")}
    for name, d in dirs.items():
        out = make_identity(d, name, node_auth=False)
        (public / f"{name}.json").write_text(json.dumps(out))
        assert set(out) == {"name", "signing", "bundle"}  # public halves only
    share_key(dirs["h0"], "h0", "fast", "run-1", ["h1", "h2"], public, mailbox)
    receive_key(dirs["h1"], "h1", "h0", "run-1", public, mailbox)
    assert (dirs["h1"] / SECRET_CONTEXT).read_bytes() == (dirs["h0"] / SECRET_CONTEXT).read_bytes()
    assert (dirs["h1"] / SECRET_CONTEXT).stat().st_mode & 0o777 == 0o600
    # h2's sealed key does not open for h1, nor under another run id
    (mailbox / "h0--h1.sealed").write_bytes((mailbox / "h0--h2.sealed").read_bytes())
    with pytest.raises(ChannelError):
        receive_key(dirs["h1"], "h1", "h0", "run-1", public, mailbox)
    with pytest.raises(ChannelError):
        receive_key(dirs["h2"], "h2", "h0", "run-2", public, mailbox)


def test_stop_ends_the_whole_tree_by_pid(tmp_path):
    procs = Processes(tmp_path / "logs", env={"PATH": "/usr/bin:/bin"})
    procs.start("parent", ["sh", "-c", "sleep 60 & sleep 60 & wait"], cwd=tmp_path)
    deadline = time.monotonic() + 5
    while len(procs.tree()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = procs.tree()
    assert len(tree) == 3
    assert procs.stop(grace=2) == []
    assert not any(alive(p) for p in tree)


_HOLD = """
import sys, time
from pathlib import Path
from medfed.crypto.context import load_public_context, load_secret_context
from medfed.crypto.seal import SealEngine
raw = Path(sys.argv[1]).read_bytes()
ctx = load_secret_context(raw) if sys.argv[2] == "secret" else load_public_context(raw)
engine = SealEngine(ctx)
del raw
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("holds", ["secret", "public"])
def test_memory_scan_finds_a_loaded_secret_key_and_nothing_in_a_public_only_process(
    tmp_path, holds
):
    ctx = make_secret_context(PRESETS["fast"])
    secret = secret_context_bytes(ctx)
    path = tmp_path / "ctx.bin"
    path.write_bytes(secret if holds == "secret" else public_context_bytes(ctx))
    patterns = secret_key_patterns(secret, "h0/secret key")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), holds], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        found = scan_memory(proc.pid, patterns)
    finally:
        proc.kill()
        proc.wait()
    if holds == "secret":  # the control: a process holding the key is caught
        assert found["h0/secret key (in memory)"] and any(
            hit for label, hit in found.items() if "stored" in label
        )
    else:
        assert not any(found.values()), found


def test_secret_patterns_cover_every_private_file(tmp_path):
    d = tmp_path / "hospital_0"
    make_identity(d, "h0", node_auth=True)
    (d / SECRET_CONTEXT).write_bytes(secret_context_bytes(make_secret_context(PRESETS["fast"])))
    labels = secret_patterns(tmp_path, 1)
    assert {"hospital_0/signing_key.bin[0]", "hospital_0/channel_identity.bin[1]"} <= set(labels)
    assert "hospital_0/secret key (in memory)" in labels


def test_deploy_cli_refuses_another_backend():
    from medfed.deploy import main

    assert main(["--backend", "local"]) == 2


def _config(mode: str, backend: str, **extra) -> medfed.SimulationConfig:
    return medfed.SimulationConfig(
        hospitals=3, mode=mode, epochs=4, rounds=2, backend=backend, progress=False, **extra
    )


@pytest.mark.deployment
@pytest.mark.parametrize("mode", ["embeddings", "updates"])
def test_a_real_deployment_matches_the_in_process_run_and_keeps_parties_apart(tmp_path, mode):
    hospitals = synthetic_hospitals(n_hospitals=3, n=150, d=8, n_classes=2)
    local = medfed.federate(_config(mode, "local"), hospitals)
    audit = mode == "embeddings"
    deployed = medfed.federate(
        _config(mode, "deploy", audit=audit, out=str(tmp_path / "out")), hospitals
    )
    # the same federation: CKKS noise differs with the keys, so within its tolerance
    assert abs(deployed["accuracy"] - local["accuracy"]) <= 1 / 75 + 1e-9  # one test sample
    assert abs(deployed["auc"] - local["auc"]) <= 0.01
    assert deployed["reference_accuracy"] == local["reference_accuracy"]
    # the same messages (which hospital holds which masked-sum round follows Flower's node ids)
    assert set(deployed["bytes_per_party"]) == set(local["bytes_per_party"])
    for key in ("bytes_up", "bytes_down"):
        assert deployed[key] == pytest.approx(local[key], rel=0.02)
    d = deployed["deployment"]
    assert d["tls"] and d["supernode_auth"] and d["processes"]["supernodes"] == 3
    assert d["left_running"] == [] and d["processes"]["serverapp_pids"]
    assert not any(alive(p) for p in d["processes"]["serverapp_pids"])
    logs = tmp_path / "out" / "deployment"
    assert {"superlink.log", "flwr-run.log", "supernode-2.log"} <= {p.name for p in logs.iterdir()}
    sep = d["separation"]
    assert sep["fd_samples"] > 0 and sep["files_seen_open"] > 0
    assert sep["hospital_files_seen_open"] == []
    if audit:
        # the ServerApp's own audit works (it saw its own files) and saw no hospital's file
        assert {"settings.pkl", "signing_key.bin", "pinned.json"} <= set(sep["own_files_opened"])
        assert sep["hospital_files_opened"] == []
        # per hospital: signing key (1), channel keys (2), CKKS key stored (3) and resident (1)
        assert sep["memory"]["patterns"] == 3 * 7 and sep["memory"]["found"] == []


def test_no_deployment_process_outlives_the_tests():
    """Run last in this file: no SuperLink or SuperNode of a medfed workspace still runs."""
    left = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"flower-super" in cmdline and b"medfed-hospitals-" in cmdline:
            left.append(int(entry.name))
    assert left == []
