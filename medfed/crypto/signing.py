"""Ed25519 signatures of protocol messages, under public keys pinned at provisioning.

Every party (the aggregator and each hospital) gets an Ed25519 key pair from the provisioning
authority (:func:`provision_keys`; in a simulation the harness plays it, as it does for the
CKKS key). Each party also gets the public keys of every party and the run's id
(:class:`PinnedKeys`); it trusts no other key, and no key that arrives in a message.

A signature covers a :func:`statement`: the run id, the kind of message, the Flower message
type and stage, the round id (the aggregator's per-message nonce), the sender, the recipient
and a digest of the payload, each length-prefixed so that no two field lists encode alike.
Only ``cryptography``'s Ed25519 is used: nothing here is home-made cryptography.

Sizes: a signature is 64 bytes, a public key 32, a private key 32.
"""

from __future__ import annotations

import functools
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from medfed.errors import MedfedError

__all__ = [
    "AGGREGATOR",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "KeyRing",
    "PinnedKeys",
    "SignatureError",
    "SigningKey",
    "provision_keys",
    "statement",
    "verify",
]

#: The aggregator's party name (no hospital may use it).
AGGREGATOR = "aggregator"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
_DOMAIN = b"medfed/signed-statement/v1"
_FIELDS = ("kind", "run_id", "message_type", "stage", "round_id", "sender", "recipient", "digest")


class SignatureError(MedfedError, ValueError):
    """A signature that does not verify, or a party without a pinned key; names the reason."""


def statement(
    kind: str,
    *,
    run_id: str,
    message_type: str,
    stage: str,
    round_id: str,
    sender: str,
    recipient: str,
    digest: str,
) -> bytes:
    """The canonical bytes a signature covers (every field length-prefixed, in fixed order)."""
    values = dict(
        kind=kind,
        run_id=run_id,
        message_type=message_type,
        stage=stage,
        round_id=round_id,
        sender=sender,
        recipient=recipient,
        digest=digest,
    )
    out = bytearray(_DOMAIN)
    for name in _FIELDS:
        raw = str(values[name]).encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(public_key: bytes, signature: Any, message: bytes, *, who: str) -> None:
    """Check ``signature`` over ``message`` under ``public_key``; :class:`SignatureError` if not.

    ``who`` names the signer in the error.
    """
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        got = len(signature) if isinstance(signature, bytes | bytearray) else "no"
        raise SignatureError(
            f"the message from {who} carries {got} signature bytes, not an Ed25519 signature "
            f"({SIGNATURE_BYTES} bytes): unsigned or truncated; rejected"
        )
    try:
        _public(bytes(public_key)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"the signature of {who} does not verify under its pinned public key: forged, "
            "altered, or signed for another run, round, stage or recipient; rejected"
        ) from None


@dataclass(frozen=True)
class PinnedKeys:
    """The run id and every party's Ed25519 public key, as provisioned (what a party trusts)."""

    run_id: str
    aggregator: bytes
    hospitals: Mapping[str, bytes]

    def key_of(self, party: str) -> bytes:
        """The pinned public key of ``party`` (:data:`AGGREGATOR` or a hospital's name)."""
        if party == AGGREGATOR:
            return self.aggregator
        try:
            return self.hospitals[party]
        except KeyError:
            raise SignatureError(
                f"no public key is pinned for {str(party)[:40]!r}: not a provisioned party of "
                "this run; rejected"
            ) from None

    def verify(self, party: str, signature: Any, message: bytes) -> None:
        """Check that ``party`` (by its pinned key) signed ``message``."""
        verify(self.key_of(party), signature, message, who=str(party)[:40])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the run id and hex public keys (a hospital's ``meta.json`` ``pinned``)."""
        return {
            "run_id": self.run_id,
            "aggregator": self.aggregator.hex(),
            "hospitals": {name: key.hex() for name, key in self.hospitals.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PinnedKeys:
        """Read :meth:`to_dict`'s mapping back; :class:`SignatureError` if malformed."""
        try:
            keys = cls(
                str(data["run_id"]),
                bytes.fromhex(data["aggregator"]),
                {str(k): bytes.fromhex(v) for k, v in data["hospitals"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SignatureError(f"malformed pinned keys ({type(e).__name__})") from None
        if any(len(k) != PUBLIC_KEY_BYTES for k in (keys.aggregator, *keys.hospitals.values())):
            raise SignatureError(f"a pinned public key is not {PUBLIC_KEY_BYTES} bytes")
        return keys

    def __repr__(self) -> str:
        return f"PinnedKeys(run_id={self.run_id!r}, hospitals={sorted(self.hospitals)})"


@dataclass(frozen=True)
class SigningKey:
    """One party's private Ed25519 key (raw, 32 bytes), its name and the keys it trusts.

    Keep it in the party's process or its private workspace: only signatures leave it.
    """

    name: str
    private: bytes = field(repr=False)
    pinned: PinnedKeys

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature (64 bytes) of ``message``."""
        return _loaded(self.private).sign(message)

    @property
    def public(self) -> bytes:
        """This party's public key (32 bytes)."""
        return _raw_public(_loaded(self.private))


@functools.lru_cache(maxsize=1024)
def _public(raw: bytes) -> Ed25519PublicKey:
    """The key object of a raw public key, loaded once per process."""
    return Ed25519PublicKey.from_public_bytes(raw)


@functools.lru_cache(maxsize=256)
def _loaded(private: bytes) -> Ed25519PrivateKey:
    """The key object of raw private bytes, loaded once per process (loading costs ~80 us)."""
    return Ed25519PrivateKey.from_private_bytes(private)


@dataclass(frozen=True)
class KeyRing:
    """What the provisioning authority hands out: the aggregator's key and the hospitals'."""

    pinned: PinnedKeys
    aggregator: SigningKey = field(repr=False)
    hospitals: tuple[SigningKey, ...] = field(repr=False)


def _private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def provision_keys(hospitals: Sequence[str], run_id: str | None = None) -> KeyRing:
    """Fresh Ed25519 key pairs for the aggregator and each hospital (by name, in order), and a
    random run id (unless ``run_id`` is given); every party pins every public key."""
    names = [str(n) for n in hospitals]
    if len(set(names)) != len(names) or AGGREGATOR in names:
        raise SignatureError(
            f"hospital names {names} must be unique and must not be {AGGREGATOR!r}: each party "
            "is pinned under its name"
        )
    agg = Ed25519PrivateKey.generate()
    keys = [Ed25519PrivateKey.generate() for _ in names]
    pinned = PinnedKeys(
        run_id or f"run-{secrets.token_hex(16)}",
        _raw_public(agg),
        {n: _raw_public(k) for n, k in zip(names, keys, strict=True)},
    )
    return KeyRing(
        pinned,
        SigningKey(AGGREGATOR, _private(agg), pinned),
        tuple(SigningKey(n, _private(k), pinned) for n, k in zip(names, keys, strict=True)),
    )


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as raw ``(private, public)`` bytes: what a party makes for
    itself when it provisions its own identity (deployments); the public half is pinned."""
    key = Ed25519PrivateKey.generate()
    return _private(key), _raw_public(key)
