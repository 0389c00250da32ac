"""SEAL's uncompressed serialization of a ciphertext, for transfers between the aggregator's
own processes.

TenSEAL's binding saves ciphertexts only with SEAL's default compression (zstd): about 2.5 ms
for a top-level ciphertext here, nearly what a rotation costs, so a worker could not share a
rotated ciphertext for less than recomputing it. This module writes the same object in SEAL's
own format with ``compr_mode_type::none`` (about 0.2 ms): the header, the ciphertext's metadata
and its coefficients. Those are read from the ciphertext's memory through ``/proc/self/mem``:

* a read at a wrong address fails with an ``OSError`` (never a crash), and nothing is written;
* the object is used only when every metadata field read from memory (the 256-bit parameter
  id, size, degree, modulus count, scale, array size) equals what SEAL's API reports;
* otherwise :func:`save_uncompressed` returns ``None`` and the caller uses SEAL's own save.

Loading needs nothing special: SEAL's ``load`` reads either compression mode and validates the
data against the context, as for any other bytes.
"""

from __future__ import annotations

import os
import struct

import tenseal.sealapi as sa

from medfed.crypto.scratch import Scratch

_WORD = 8
_META = 80  # bytes of the ciphertext object before its coefficient array (SEAL 4.x layout)
_ARRAY = 96  # DynArray: capacity, size, data pointer
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compr, -, size
_NONE = 0  # compr_mode_type::none


class _Memory:
    """Reads of this process's memory that fail cleanly on a bad address."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/self/mem", os.O_RDONLY)
        except OSError:
            self.fd = None
        self.pid = os.getpid()

    def read(self, address: int, size: int) -> bytes | None:
        if self.fd is None or address <= 0:
            return None
        try:
            data = os.pread(self.fd, size, address)
        except OSError:
            return None
        return data if len(data) == size else None


_memory: _Memory | None = None
_version: tuple[int, int, int] | None = None  # magic, version major, minor of this SEAL build


def _mem() -> _Memory:
    global _memory
    if _memory is None or _memory.pid != os.getpid():  # a forked process reopens its own
        _memory = _Memory()
    return _memory


def _seal_version() -> tuple[int, int, int]:
    global _version
    if _version is None:
        probe = Scratch("probe")
        try:
            sa.Ciphertext().save(probe.path)
            magic, _, major, minor, *_ = _HEADER.unpack(probe.read()[: _HEADER.size])
        finally:
            probe.close()
        _version = (magic, major, minor)
    return _version


def save_uncompressed(ct: sa.Ciphertext) -> bytes | None:
    """``ct`` in SEAL's serialization format without compression, or ``None`` if its memory
    does not look exactly as expected (then use SEAL's own ``save``)."""
    mem = _mem()
    holder = mem.read(id(ct) + 2 * _WORD, _WORD)  # pybind11 instance: the C++ object's address
    if holder is None:
        return None
    obj = int.from_bytes(holder, "little")
    raw = mem.read(obj, _ARRAY + 3 * _WORD)
    if raw is None:
        return None
    size, degree, moduli = ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size()
    n = size * degree * moduli
    parms = struct.unpack_from("<4Q", raw, 0)
    fields = struct.unpack_from("<3Qd", raw, 40)
    capacity, length, data = struct.unpack_from("<3Q", raw, _ARRAY)
    if (
        list(parms) != [int(p) for p in ct.parms_id()]
        or fields != (size, degree, moduli, ct.scale)
        or raw[32] != int(ct.is_ntt_form())
        or length != n
        or capacity < n
    ):
        return None
    coeffs = mem.read(data, n * _WORD)
    if coeffs is None or int.from_bytes(coeffs[:_WORD], "little") != ct.data():
        return None
    members = raw[:33] + raw[40:_META]  # parms id, is_ntt byte, size, degree, moduli, scale, cf
    return frame(members, coeffs, n)


def frame(members: bytes, words: bytes, count: int) -> bytes:
    """A SEAL object in its serialization format without compression: the header, the
    object's ``members``, then its array of ``count`` 64-bit ``words`` with the array's own
    header (what SEAL's ``save`` writes with ``compr_mode_type::none``)."""
    magic, major, minor = _seal_version()
    inner_size = _HEADER.size + _WORD + len(words)
    total = _HEADER.size + len(members) + inner_size
    return b"".join(
        (
            _HEADER.pack(magic, _HEADER.size, major, minor, _NONE, 0, total),
            members,
            _HEADER.pack(magic, _HEADER.size, major, minor, _NONE, 0, inner_size),
            struct.pack("<Q", count),
            words,
        )
    )
