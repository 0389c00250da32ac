"""Sealed hospital-to-hospital messages (medfed.crypto.channel), and the OpenFHE-free import
of medfed.crypto.threshold. Runs in the main environment (no OpenFHE needed)."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys

import pytest

from medfed.crypto.channel import (
    ChannelError,
    Identity,
    channel_context,
    fingerprint,
    open_sealed,
    seal,
)


@pytest.fixture(scope="module")
def parties():
    return {name: Identity.generate() for name in ("h1", "h2", "h3")}


def ctx(round: int = 3, sender: str = "h1", recipient: str = "h2", run: str = "run-a") -> bytes:
    return channel_context(run, round, sender, recipient, "threshold/partial-decryption")


def test_roundtrip(parties):
    h1, h2 = parties["h1"], parties["h2"]
    payload = bytes(range(256)) * 1000
    sealed = seal(h1, h2.public_bundle(), payload, ctx())
    assert payload[:64] not in sealed
    assert open_sealed(h2, h1.public_bundle(), sealed, ctx()) == payload
    empty = seal(h1, h2.public_bundle(), b"", ctx())
    assert open_sealed(h2, h1.public_bundle(), empty, ctx()) == b""
    # fresh ephemeral key and nonce: sealing twice gives different bytes
    assert seal(h1, h2.public_bundle(), payload, ctx()) != sealed
    assert len(sealed) - len(payload) == 7 + 4 * 32 + 12 + 16 + 64


def test_tampered_bytes_are_refused(parties):
    h1, h2 = parties["h1"], parties["h2"]
    sealed = bytearray(seal(h1, h2.public_bundle(), b"partial decryption share", ctx()))
    for pos in (len(sealed) // 2, 7 + 96 + 5, -70, -1):  # ciphertext, eph key, tag, signature
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(ChannelError, match="tampered|authenticate"):
            open_sealed(h2, h1.public_bundle(), bytes(bad), ctx())
    with pytest.raises(ChannelError, match="truncated"):
        open_sealed(h2, h1.public_bundle(), bytes(sealed[:50]), ctx())
    with pytest.raises(ChannelError, match="magic"):
        open_sealed(h2, h1.public_bundle(), b"X" + bytes(sealed[1:]), ctx())


def test_wrong_recipient_and_wrong_sender(parties):
    h1, h2, h3 = parties["h1"], parties["h2"], parties["h3"]
    sealed = seal(h1, h2.public_bundle(), b"secret", ctx())
    with pytest.raises(ChannelError, match="another recipient"):
        open_sealed(h3, h1.public_bundle(), sealed, ctx())
    aggregator = Identity.generate()  # the relay has keys of its own, not the recipient's
    with pytest.raises(ChannelError, match="another recipient"):
        open_sealed(aggregator, h1.public_bundle(), sealed, ctx())
    with pytest.raises(ChannelError, match="another sender"):
        open_sealed(h2, h3.public_bundle(), sealed, ctx())


def test_forged_sender_fingerprint_is_refused(parties):
    """h3 re-signs h1's message as its own: the header is authenticated, so it fails."""
    h1, h2, h3 = parties["h1"], parties["h2"], parties["h3"]
    sealed = seal(h1, h2.public_bundle(), b"secret", ctx())
    forged = bytearray(sealed)
    forged[7 : 7 + 32] = fingerprint(h3.public_bundle())
    body = bytes(forged[:-64])
    forged[-64:] = h3.signing_key.sign(b"medfed/channel/v1/ed25519" + body + ctx())
    with pytest.raises(ChannelError, match="authenticate"):
        open_sealed(h2, h3.public_bundle(), bytes(forged), ctx())


@pytest.mark.parametrize(
    "other",
    [
        ctx(round=4),
        ctx(run="run-b"),
        ctx(sender="h3"),
        ctx(recipient="h3"),
        channel_context("run-a", 3, "h1", "h2", "threshold/key-share"),
    ],
)
def test_replay_under_another_context(parties, other):
    h1, h2 = parties["h1"], parties["h2"]
    sealed = seal(h1, h2.public_bundle(), b"round 3 partial", ctx())
    with pytest.raises(ChannelError, match="another context"):
        open_sealed(h2, h1.public_bundle(), sealed, other)


def test_context_encoding_is_unambiguous():
    assert channel_context("a", 1, "b|c", "d", "p") != channel_context("a", 1, "b", "c|d", "p")
    assert channel_context("ab", 1, "c", "d", "p") != channel_context("a", 1, "bc", "d", "p")


def test_bad_inputs(parties):
    h1, h2 = parties["h1"], parties["h2"]
    with pytest.raises(ChannelError, match="bundle"):
        seal(h1, b"short", b"x", ctx())
    with pytest.raises(ChannelError, match="context"):
        seal(h1, h2.public_bundle(), b"x", b"")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(h1)
    assert "Ed25519PrivateKey" not in repr(h1) and "X25519PrivateKey" not in repr(h1)


def test_threshold_module_imports_without_openfhe_or_heavy_deps():
    code = (
        "import sys, medfed.crypto.threshold as t\n"
        "heavy = [m for m in ('torch', 'timm', 'tenseal', 'flwr') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(t.openfhe_available())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() in ("True", "False")


@pytest.mark.skipif(
    importlib.util.find_spec("openfhe") is not None, reason="OpenFHE is installed here"
)
def test_threshold_entry_points_explain_how_to_get_openfhe():
    from medfed.crypto import threshold as t

    params = t.THRESHOLD_PRESETS["test"]  # parameters validate without OpenFHE
    for call in (
        lambda: t.ThresholdContext.generate(params),
        lambda: t.ThresholdContext.from_bytes(b"x"),
        lambda: t.ThresholdAggregator(b"x"),
        lambda: t.ThresholdParty(None, 1),
    ):
        with pytest.raises(t.ThresholdUnavailableError) as info:
            call()
        msg = str(info.value)
        assert "CPython 3.10 and 3.12" in msg and ".[threshold]" in msg
        assert "--keys shared" in msg
