"""End-to-end sealed messages between hospitals, relayed by the aggregator as opaque bytes.

Used in the threshold setup for everything secret that one hospital sends another through the
aggregator: partial decryptions (which the aggregator must not fuse) and Shamir shares of key
shares. The construction follows Flower's SecAgg+ (X25519 key agreement + HKDF + AES-GCM) and
adds an Ed25519 signature so the recipient knows which hospital sealed the message. Only
``cryptography`` primitives are used; nothing here is home-made cryptography.

Wire format of a sealed message (all lengths fixed except the ciphertext)::

    magic "MFSEAL1" | sender fp (32) | recipient fp (32) | context digest (32)
    | ephemeral X25519 public key (32) | nonce (12)
    | AES-256-GCM ciphertext + tag | Ed25519 signature (64)

* fp = SHA-256 of a party's public bundle; the context digest is SHA-256 of ``context``.
* Key: HKDF-SHA256 over X25519(ephemeral, recipient static), with ``info`` binding the
  ephemeral and recipient public keys. A fresh ephemeral key per message gives a fresh AES key.
* AES-GCM associated data = header (everything before the ciphertext) + ``context``.
* The sender signs header + ciphertext + ``context`` with its Ed25519 key.

``context`` should come from :func:`channel_context`: it binds the run id, the round, the sender,
the recipient and the purpose, so bytes replayed into another run, round, pair of parties or
purpose are refused. A replay of the same bytes under the same context is not detected here
(the caller's round bookkeeping rejects duplicates).

This module assumes the public bundles are authentic. In medfed they are exchanged through the
aggregator in the key setup round, each signed by the hospital that made it under the Ed25519
key pinned at provisioning (:mod:`medfed.crypto.signing`); every hospital checks those
signatures before it seals to or opens from a bundle (``medfed.fl.ciphers.threshold.endorse``),
so an aggregator that swaps a bundle is refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.errors import MedfedError

__all__ = [
    "ChannelError",
    "Identity",
    "channel_context",
    "fingerprint",
    "open_sealed",
    "seal",
]

_BUNDLE_MAGIC = b"MFID1"
_SEAL_MAGIC = b"MFSEAL1"
_CONTEXT_MAGIC = b"medfed/channel-context/v1"
_HKDF_INFO = b"medfed/channel/v1/x25519-hkdf-sha256-aes256gcm"
_SIG_DOMAIN = b"medfed/channel/v1/ed25519"
_KEY_LEN = 32
_FP_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_SIG_LEN = 64
_HEADER_LEN = len(_SEAL_MAGIC) + 3 * _FP_LEN + _KEY_LEN + _NONCE_LEN
_BUNDLE_LEN = len(_BUNDLE_MAGIC) + 2 * _KEY_LEN


class ChannelError(MedfedError, ValueError):
    """A sealed message that cannot be opened; the message names the reason."""


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class Identity:
    """A party's long-term channel keys: X25519 (key agreement) and Ed25519 (signatures).

    Holds private keys: keep it in the party's process. Only :meth:`public_bundle` leaves it.
    """

    exchange_key: X25519PrivateKey = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity with newly generated X25519 and Ed25519 private keys."""
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def public_bundle(self) -> bytes:
        """``magic | X25519 public key (32) | Ed25519 public key (32)``: safe to publish."""
        return (
            _BUNDLE_MAGIC
            + _raw_public(self.exchange_key.public_key())
            + _raw_public(self.signing_key.public_key())
        )

    def fingerprint(self) -> bytes:
        """SHA-256 of this party's public bundle: the id others seal to and check against."""
        return fingerprint(self.public_bundle())

    def private_bytes(self) -> bytes:
        """Both raw private keys (64 bytes), for the party's own key file (0600), never a wire."""
        raw = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw)
        none = serialization.NoEncryption()
        return self.exchange_key.private_bytes(*raw, none) + self.signing_key.private_bytes(
            *raw, none
        )

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Identity:
        """The identity :meth:`private_bytes` wrote; :class:`ChannelError` if malformed."""
        if not isinstance(data, bytes | bytearray) or len(data) != 64:
            raise ChannelError("a channel identity file holds 64 bytes (two raw private keys)")
        return cls(
            X25519PrivateKey.from_private_bytes(bytes(data[:32])),
            Ed25519PrivateKey.from_private_bytes(bytes(data[32:])),
        )

    def __reduce__(self):
        raise TypeError("Identity holds private keys and cannot be pickled")


def fingerprint(bundle: bytes) -> bytes:
    """SHA-256 of a public bundle (32 bytes)."""
    return hashlib.sha256(bundle).digest()


def _parse_bundle(bundle: bytes, role: str) -> tuple[X25519PublicKey, Ed25519PublicKey]:
    if not isinstance(bundle, bytes | bytearray) or len(bundle) != _BUNDLE_LEN:
        raise ChannelError(f"malformed {role} public bundle (expected {_BUNDLE_LEN} bytes)")
    bundle = bytes(bundle)
    if not bundle.startswith(_BUNDLE_MAGIC):
        raise ChannelError(f"malformed {role} public bundle (bad magic)")
    off = len(_BUNDLE_MAGIC)
    try:
        x = X25519PublicKey.from_public_bytes(bundle[off : off + _KEY_LEN])
        ed = Ed25519PublicKey.from_public_bytes(bundle[off + _KEY_LEN :])
    except ValueError as e:
        raise ChannelError(f"malformed {role} public bundle: {e}") from None
    return x, ed


def channel_context(
    run_id: str, round: int, sender: str | int, recipient: str | int, purpose: str
) -> bytes:
    """Canonical, unambiguous encoding of what a sealed message is bound to."""
    out = bytearray(_CONTEXT_MAGIC)
    for value in (run_id, str(int(round)), str(sender), str(recipient), purpose):
        raw = str(value).encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def _derive_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    info = _HKDF_INFO + eph_pub + recipient_pub
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_LEN, salt=None, info=info).derive(shared)


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, bytes | bytearray) or not context:
        raise ChannelError("context must be non-empty bytes (use channel_context())")
    return bytes(context)


def seal(sender: Identity, recipient_bundle: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt ``plaintext`` for the holder of ``recipient_bundle``, signed by ``sender``."""
    context = _check_context(context)
    recipient_x, _ = _parse_bundle(recipient_bundle, "recipient")
    recipient_pub = _raw_public(recipient_x)
    eph = X25519PrivateKey.generate()
    eph_pub = _raw_public(eph.public_key())
    key = _derive_key(eph.exchange(recipient_x), eph_pub, recipient_pub)
    nonce = os.urandom(_NONCE_LEN)
    header = (
        _SEAL_MAGIC
        + sender.fingerprint()
        + fingerprint(bytes(recipient_bundle))
        + hashlib.sha256(context).digest()
        + eph_pub
        + nonce
    )
    ciphertext = AESGCM(key).encrypt(nonce, bytes(plaintext), header + context)
    signature = sender.signing_key.sign(_SIG_DOMAIN + header + ciphertext + context)
    return header + ciphertext + signature


def open_sealed(recipient: Identity, sender_bundle: bytes, sealed: bytes, context: bytes) -> bytes:
    """Verify and decrypt a message sealed by the holder of ``sender_bundle`` for ``recipient``.

    Raises:
        ChannelError: naming the first check that failed (format, recipient, sender, context,
            signature, decryption).
    """
    context = _check_context(context)
    _, sender_ed = _parse_bundle(sender_bundle, "sender")
    if not isinstance(sealed, bytes | bytearray):
        raise ChannelError(f"sealed message must be bytes, got {type(sealed).__name__}")
    sealed = bytes(sealed)
    if len(sealed) < _HEADER_LEN + _TAG_LEN + _SIG_LEN:
        raise ChannelError(f"sealed message truncated ({len(sealed)} bytes)")
    if not sealed.startswith(_SEAL_MAGIC):
        raise ChannelError("not a medfed sealed message (bad magic or version)")
    off = len(_SEAL_MAGIC)
    sender_fp = sealed[off : off + _FP_LEN]
    recipient_fp = sealed[off + _FP_LEN : off + 2 * _FP_LEN]
    context_digest = sealed[off + 2 * _FP_LEN : off + 3 * _FP_LEN]
    eph_pub = sealed[off + 3 * _FP_LEN : off + 3 * _FP_LEN + _KEY_LEN]
    nonce = sealed[_HEADER_LEN - _NONCE_LEN : _HEADER_LEN]
    header = sealed[:_HEADER_LEN]
    ciphertext = sealed[_HEADER_LEN:-_SIG_LEN]
    signature = sealed[-_SIG_LEN:]

    if recipient_fp != recipient.fingerprint():
        raise ChannelError("sealed for another recipient: this party cannot open it")
    if sender_fp != fingerprint(bytes(sender_bundle)):
        raise ChannelError("sealed by another sender than the one expected")
    if context_digest != hashlib.sha256(context).digest():
        raise ChannelError(
            "sealed under another context (a replay from another run, round, sender/recipient "
            "pair or purpose?)"
        )
    try:
        sender_ed.verify(signature, _SIG_DOMAIN + header + ciphertext + context)
    except InvalidSignature:
        raise ChannelError("signature check failed: the sealed bytes were tampered with") from None
    try:
        eph = X25519PublicKey.from_public_bytes(eph_pub)
        recipient_pub = _raw_public(recipient.exchange_key.public_key())
        key = _derive_key(recipient.exchange_key.exchange(eph), eph_pub, recipient_pub)
        return AESGCM(key).decrypt(nonce, ciphertext, header + context)
    except (InvalidTag, ValueError):
        raise ChannelError("decryption failed: the ciphertext does not authenticate") from None
