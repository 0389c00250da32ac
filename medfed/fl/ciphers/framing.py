"""Framing of one contribution: one blob holding one or more ciphertexts (or plain parts).

A vector longer than one ciphertext's slots is split over several ciphertexts
(:func:`chunks`, :func:`chunk_sizes`); a contribution is one framed blob (:func:`frame`)
either way, and :func:`unframe` checks a received blob before anything parses its parts.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from medfed.crypto.errors import CiphertextError

_FRAME_MAGIC = b"MFUPD1"
#: Most ciphertexts one contribution may hold (a head of 32k values at 4096 slots is 8).
MAX_PARTS = 64


def frame(parts: Sequence[bytes]) -> bytes:
    """One blob from several ciphertexts: magic, count, then (length, bytes) per part."""
    out = bytearray(_FRAME_MAGIC + struct.pack(">I", len(parts)))
    for part in parts:
        out += struct.pack(">Q", len(part)) + bytes(part)
    return bytes(out)


def unframe(blob: bytes, *, sender: str = "sender", item: str = "update") -> list[bytes]:
    """Inverse of :func:`frame`; :class:`CiphertextError` naming the sender if malformed."""
    if not isinstance(blob, bytes | bytearray):
        raise CiphertextError(f"{item} from {sender}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    head = len(_FRAME_MAGIC) + 4
    if not blob.startswith(_FRAME_MAGIC) or len(blob) < head:
        raise CiphertextError(f"{item} from {sender} is not a medfed update blob (bad magic)")
    (count,) = struct.unpack(">I", blob[len(_FRAME_MAGIC) : head])
    if not 1 <= count <= MAX_PARTS:
        raise CiphertextError(f"{item} from {sender} holds {count} parts (1..{MAX_PARTS})")
    parts, off = [], head
    for _ in range(count):
        if off + 8 > len(blob):
            raise CiphertextError(f"{item} from {sender} is truncated")
        (size,) = struct.unpack(">Q", blob[off : off + 8])
        off += 8
        if off + size > len(blob):
            raise CiphertextError(f"{item} from {sender} is truncated")
        parts.append(blob[off : off + size])
        off += size
    if off != len(blob):
        raise CiphertextError(f"{item} from {sender} has trailing bytes")
    return parts


def chunk_sizes(length: int, slots: int) -> list[int]:
    """How a vector of ``length`` values is split over ciphertexts of ``slots`` slots."""
    n = max(1, math.ceil(length / slots))
    return [min(slots, length - k * slots) for k in range(n)]


def chunks(vector: np.ndarray, slots: int) -> list[np.ndarray]:
    """``vector`` (flattened, float64) cut into pieces of at most ``slots`` values."""
    v = np.asarray(vector, dtype=np.float64).ravel()
    return [v[k : k + slots] for k in range(0, max(len(v), 1), slots)]
