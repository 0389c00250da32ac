"""Byte formats of the threshold protocol's messages, apart from the context's own.

Partial decryptions (bound to the SHA-256 digest of the aggregate they decrypt), Shamir key
shares in OpenFHE's serialisable DCRTPoly box, public keys, and the channel purposes that bind
each sealed message to its role. Layouts are in "Wire formats" in docs/threshold-protocol.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medfed.crypto.threshold.backend import _require_openfhe
from medfed.crypto.threshold.errors import ThresholdError

if TYPE_CHECKING:
    from medfed.crypto.threshold.context import ThresholdContext

_PARTIAL_MAGIC = b"MFPD1"
_SHARE_MAGIC = b"MFKS1"
#: Channel purposes, bound into each sealed message's context with run, round and both parties.
PURPOSE_KEY_SHARE = "threshold/key-share"
PURPOSE_RECOVERY_SHARE = "threshold/recovery-share"
PURPOSE_PARTIAL = "threshold/partial-decryption"
PURPOSE_REFRESH = "threshold/refresh-element"


def _digest(data: bytes) -> bytes:
    """SHA-256 of ``data``: which aggregate a partial decryption belongs to."""
    return hashlib.sha256(bytes(data)).digest()


def _pack_partials(digest: bytes, items: Sequence[tuple[int, bytes]]) -> bytes:
    """One hospital's partial decryptions, ``(key share, serialised ciphertext)`` each."""
    out = bytearray(_PARTIAL_MAGIC + digest + struct.pack(">B", len(items)))
    for share, blob in items:
        out += struct.pack(">HI", share, len(blob)) + blob
    return bytes(out)


def _unpack_partials(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """``(aggregate digest, [(key share, bytes), ...])`` from :func:`_pack_partials`'s bytes."""
    data = bytes(data)
    head = len(_PARTIAL_MAGIC)
    if not data.startswith(_PARTIAL_MAGIC) or len(data) < head + 33:
        raise ThresholdError("not a medfed partial decryption (bad magic)")
    digest = data[head : head + 32]
    (count,) = struct.unpack(">B", data[head + 32 : head + 33])
    off, items = head + 33, []
    for _ in range(count):
        if off + 6 > len(data):
            raise ThresholdError("partial decryption truncated")
        share, size = struct.unpack(">HI", data[off : off + 6])
        off += 6
        if off + size > len(data):
            raise ThresholdError("partial decryption truncated")
        items.append((share, data[off : off + size]))
        off += size
    if off != len(data):
        raise ThresholdError("partial decryption has trailing bytes")
    return digest, items


def _pack_share(context: ThresholdContext, owner: int, holder: int, poly, box) -> bytes:
    """``owner``'s Shamir share held by ``holder``: ``poly`` in ``box`` (an empty ciphertext)."""
    box.SetElements([poly])
    return _SHARE_MAGIC + struct.pack(">HH", owner, holder) + context._serialize(box)


def _unpack_share(context: ThresholdContext, data: bytes) -> tuple[int, int, Any]:
    """``(owner, holder, DCRTPoly)`` from :func:`_pack_share`'s bytes."""
    head = len(_SHARE_MAGIC) + 4
    if not data.startswith(_SHARE_MAGIC) or len(data) <= head:
        raise ThresholdError("not a medfed key share (bad magic)")
    owner, holder = struct.unpack(">HH", data[len(_SHARE_MAGIC) : head])
    elements = context._ciphertext(data[head:], "key share").GetElements()
    if len(elements) != 1:
        raise ThresholdError("malformed key share")
    return owner, holder, elements[0]


def _deserialize_public_key(data: bytes):
    """An OpenFHE public key from its binary serialisation; :class:`ThresholdError` if not."""
    of = _require_openfhe()
    try:
        return of.DeserializePublicKeyString(bytes(data), of.BINARY)
    except (RuntimeError, TypeError) as e:
        raise ThresholdError(f"not an OpenFHE public key: {e}") from None


def pack_blobs(magic: bytes, header: dict[str, Any], blobs: dict[str, bytes]) -> bytes:
    """``magic | header length (4) | JSON header (with each blob's size) | blobs``: the
    stored-state format of a party and of a hospital's threshold cipher."""
    raw = json.dumps({**header, "blobs": {k: len(v) for k, v in blobs.items()}}).encode()
    return magic + struct.pack(">I", len(raw)) + raw + b"".join(blobs.values())


def unpack_blobs(magic: bytes, data: bytes, what: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(header, blobs by name) of :func:`pack_blobs`'s bytes; :class:`ThresholdError` naming
    ``what`` if malformed."""
    data = bytes(data)
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        raise ThresholdError(f"not a medfed {what} (bad magic)")
    off = len(magic)
    (size,) = struct.unpack(">I", data[off : off + 4])
    try:
        header = json.loads(data[off + 4 : off + 4 + size])
        sizes = header.pop("blobs")
    except (ValueError, KeyError, TypeError) as e:
        raise ThresholdError(f"malformed {what} header: {e}") from None
    off += 4 + size
    blobs = {}
    for name, n in sizes.items():
        blobs[name] = data[off : off + n]
        off += n
    if off != len(data):
        raise ThresholdError(f"{what} has trailing bytes")
    return header, blobs


#: First bytes of a party's round-A share of the joint evaluation keys.
_EVAL_SHARE_MAGIC = b"MFEK1"


def pack_eval_share(switch_key, rotation_keys, steps: Sequence[int]) -> bytes:
    """A party's round-A share: its key-switching key share (for relinearization) and its
    rotation-key shares for ``steps``."""
    of = _require_openfhe()
    blobs = {
        "switch": of.Serialize(switch_key, of.BINARY),
        "rotations": of.Serialize(rotation_keys, of.BINARY),
    }
    return pack_blobs(_EVAL_SHARE_MAGIC, {"steps": [int(k) for k in steps]}, blobs)


def unpack_eval_share(data: bytes) -> tuple[Any, Any, list[int]]:
    """(key-switching key, rotation-key map, steps) of :func:`pack_eval_share`'s bytes."""
    of = _require_openfhe()
    header, blobs = unpack_blobs(_EVAL_SHARE_MAGIC, data, "evaluation-key share")
    try:
        switch = of.DeserializeEvalKeyString(blobs["switch"], of.BINARY)
        rotations = of.DeserializeEvalKeyMapString(blobs["rotations"], of.BINARY)
        steps = [int(k) for k in header["steps"]]
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ThresholdError(f"malformed evaluation-key share: {e}") from None
    return switch, rotations, steps


def deserialize_eval_key(data: bytes, what: str):
    """An OpenFHE evaluation key from its binary serialisation; :class:`ThresholdError` if
    not."""
    of = _require_openfhe()
    try:
        return of.DeserializeEvalKeyString(bytes(data), of.BINARY)
    except (RuntimeError, TypeError) as e:
        raise ThresholdError(f"{what} is not an OpenFHE evaluation key: {e}") from None


def check_steps(steps: Sequence[int], slots: int) -> list[int]:
    """Distinct nonzero rotation steps within ``(-slots, slots)``, sorted."""
    out = sorted({int(k) for k in steps})
    bad = [k for k in out if k == 0 or abs(k) >= slots]
    if not out or bad:
        raise ThresholdError(
            f"rotation steps must be nonzero and within +-{slots - 1}, got {list(steps)}"
        )
    return out


#: First bytes of a party's collective-refresh shares.
_REFRESH_MAGIC = b"MFRS1"


def pack_refresh_shares(shares: dict[int, tuple[bytes, bytes]]) -> bytes:
    """One party's refresh shares ``{key share: (h0, h1)}`` (serialized OpenFHE elements)."""
    blobs = {}
    for k, (h0, h1) in sorted(shares.items()):
        blobs[f"h0/{k}"], blobs[f"h1/{k}"] = h0, h1
    return pack_blobs(_REFRESH_MAGIC, {"shares": sorted(shares)}, blobs)


def unpack_refresh_shares(data: bytes) -> dict[int, tuple[bytes, bytes]]:
    """``{key share: (h0, h1)}`` of :func:`pack_refresh_shares`'s bytes."""
    header, blobs = unpack_blobs(_REFRESH_MAGIC, data, "refresh share")
    try:
        return {int(k): (blobs[f"h0/{k}"], blobs[f"h1/{k}"]) for k in header["shares"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ThresholdError(f"malformed refresh share: {e}") from None
