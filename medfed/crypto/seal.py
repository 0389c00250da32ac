"""Direct SEAL operations (through the ``tenseal.sealapi`` binding shipped in the tenseal wheel).

TenSEAL's CKKSVector has no rotations and relinearizes after every product. The diagonal layout
needs both, so the aggregator's hot loop uses SEAL's Evaluator directly: products are summed
unrelinearized and relinearized once per sum, and rotations use Galois keys for a few steps
(:func:`medfed.crypto.diagonal.rotation_steps`), which every other rotation is chained from.
Hospitals encrypt with SEAL's seeded secret-key encryption (half the bytes).

:class:`SealVec` overloads ``+ - *`` like a numpy array, so the same training code runs on
numpy slot vectors (plaintext reference) and on ciphertexts.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from medfed.crypto.context import MAX_CIPHERTEXT_BYTES, CiphertextError, KeyMaterialError
from medfed.crypto.scratch import Scratch
from medfed.crypto.uncompressed import save_uncompressed


class SealEngine:
    """Encoder, evaluator and keys of one party, built from a TenSEAL context."""

    def __init__(self, ctx: ts.Context, galois_keys: bytes | None = None) -> None:
        self.ctx = ctx
        self.sc = ctx.data.seal_context()
        self.ev = sa.Evaluator(self.sc)
        self.encoder = sa.CKKSEncoder(self.sc)
        self.slots = self.encoder.slot_count()
        self.scale = float(ctx.global_scale)
        self.relin = ctx.data.relin_keys()
        self.encryptor = ctx.data.encryptor()
        self.private = ctx.is_private()
        self.decryptor = sa.Decryptor(self.sc, ctx.secret_key().data) if self.private else None
        self.sym_encryptor = sa.Encryptor(self.sc, ctx.secret_key().data) if self.private else None
        self.counts: Counter = Counter()  # (operation, level) -> calls, for op-count floors
        self._scratch: dict[str, Scratch] = {}  # "in" (loads), "out" (saves): this process's
        self.galois = self._load_galois(galois_keys) if galois_keys is not None else None
        self.parms_ids = []
        self.primes: list[list[int]] = []  # per level (0 = top): that level's primes
        data = self.sc.first_context_data()
        while data is not None:
            self.parms_ids.append(tuple(data.parms_id()))
            self.primes.append([int(m.value()) for m in data.parms().coeff_modulus()])
            data = data.next_context_data()

    # -- keys -------------------------------------------------------------------------------
    def make_galois_keys(self, steps: Iterable[int]) -> bytes:
        """Galois keys for the given rotation steps (needs the secret key)."""
        if not self.private:
            raise KeyMaterialError("only a hospital (secret key holder) can make Galois keys")
        keys = sa.GaloisKeys()
        elements = sorted({self.galois_element(s) for s in steps})
        sa.KeyGenerator(self.sc, self.ctx.secret_key().data).create_galois_keys(elements, keys)
        return self._dump(keys)

    def galois_element(self, step: int) -> int:
        """SEAL's Galois element for a slot rotation by ``step`` (``3^step mod 2N``).

        The binding takes a list of *elements* when every entry is positive, so steps are
        converted here rather than relying on overload resolution.
        """
        n = 2 * self.slots
        if not 0 < abs(step) < self.slots:
            raise ValueError(f"rotation step {step} must be in (-{self.slots}, {self.slots})")
        exponent = step if step > 0 else self.slots + step
        return pow(3, exponent, 2 * n)

    def _load_galois(self, data: bytes) -> sa.GaloisKeys:
        keys = sa.GaloisKeys()
        try:
            self._load(keys, data)
        except Exception as e:  # noqa: BLE001
            raise CiphertextError(f"Galois keys are malformed or foreign ({e})") from None
        return keys

    # -- (de)serialization ------------------------------------------------------------------
    def _file(self, kind: str) -> Scratch:
        scratch = self._scratch.get(kind)
        if scratch is None or scratch.pid != os.getpid():  # a forked process makes its own
            scratch = self._scratch[kind] = Scratch(kind)
        return scratch

    def _dump(self, obj) -> bytes:
        out = self._file("out")
        obj.save(out.path)
        return out.read()

    def _load(self, obj, data: bytes) -> None:
        """``obj`` from SEAL-serialized ``data``, whose header must state exactly its length.

        The bytes go into one reused file, written in place: truncating and refilling a tmpfs
        file costs 0.3 ms for a top-level ciphertext, 4x SEAL's load itself. The length check
        also keeps an earlier, longer load's bytes out of this one.
        """
        stated = int.from_bytes(data[8:16], "little") if len(data) >= 16 else -1
        if stated != len(data):
            raise ValueError(f"the SEAL header states {stated} bytes, the data has {len(data)}")
        scratch = self._file("in")
        scratch.write(data)
        obj.load(self.sc, scratch.path)

    def load_serialized(self, obj, data: bytes) -> None:
        """Load a SEAL object (ciphertext, plaintext, keys) this party built as bytes itself;
        SEAL checks it against the context. Bytes from another party go through
        :meth:`from_bytes`."""
        self._load(obj, data)

    def to_bytes(self, v: SealVec) -> bytes:
        """``v`` serialized in SEAL's (compressed) format, for sending."""
        return self._dump(v.ct)

    def to_uncompressed_bytes(self, v: SealVec) -> bytes:
        """``v`` in SEAL's format without compression (:mod:`medfed.crypto.uncompressed`): 10x
        faster than :meth:`to_bytes`, 1.6x larger. For transfers between the aggregator's own
        processes; anything :meth:`from_bytes` reads."""
        data = save_uncompressed(v.ct)
        return data if data is not None else self.to_bytes(v)

    def from_bytes(self, data: bytes, *, sender: str, item: str) -> SealVec:
        """Load a ciphertext sent by ``sender``, checked against this run's parameters.

        ``sender`` and ``item`` name the message in the :class:`CiphertextError` raised for bytes
        that are not a ciphertext, too large, malformed, or made under other parameters.
        """
        if not isinstance(data, bytes | bytearray):
            raise CiphertextError(
                f"{item} from {sender}: expected ciphertext bytes, got {type(data).__name__}; "
                "the sender must send serialized ciphertexts."
            )
        if len(data) > MAX_CIPHERTEXT_BYTES:
            raise CiphertextError(
                f"{item} from {sender} is {len(data)} bytes, over the {MAX_CIPHERTEXT_BYTES}-byte "
                "limit for one ciphertext; the sender must use this run's CKKS parameters."
            )
        ct = sa.Ciphertext()
        try:
            self._load(ct, bytes(data))
        except Exception as e:  # noqa: BLE001 - SEAL raises several types
            raise CiphertextError(
                f"{item} from {sender} is not a valid ciphertext for this run's parameters "
                f"({e}); the sender must encrypt under the consortium's key and parameters."
            ) from None
        if tuple(ct.parms_id()) not in self.parms_ids or ct.size() not in (2, 3):
            raise CiphertextError(
                f"{item} from {sender} does not belong to this run's CKKS parameters; the "
                "sender must re-encrypt with the run's context."
            )
        return SealVec(self, ct)

    # -- encode / encrypt / decrypt ---------------------------------------------------------
    def encode(self, values, parms_id=None, scale: float | None = None) -> sa.Plaintext:
        """Encode a scalar or one value per slot as a plaintext.

        At the top level and the engine's scale unless ``parms_id`` (a level) or ``scale`` is given.
        """
        pt = sa.Plaintext()
        scale = self.scale if scale is None else scale
        if isinstance(values, int | float | np.floating):
            args = (float(values),)
        else:
            arr = np.asarray(values, dtype=np.float64)
            if arr.shape != (self.slots,):
                raise ValueError(f"expected {self.slots} slot values, got {arr.shape}")
            args = (arr.tolist(),)
        if parms_id is None:
            self.encoder.encode(*args, scale, pt)
        else:
            self.encoder.encode(*args, parms_id, scale, pt)
        return pt

    def encrypt(self, values) -> SealVec:
        """Encrypt a scalar or one value per slot with the public key."""
        ct = sa.Ciphertext()
        self.encryptor.encrypt(self.encode(values), ct)
        self.counts["encrypt", 0] += 1
        return SealVec(self, ct)

    def encrypt_seeded(self, values):
        """Secret-key encryption whose serialization stores the seed of its random half.

        SEAL's symmetric encryption (same RLWE security as public-key encryption) is about 2x
        faster, and its bytes are half the size. Only a hospital (secret key holder) can use it.
        """
        if self.sym_encryptor is None:
            raise KeyMaterialError("secret-key encryption needs a hospital's secret key")
        self.counts["encrypt", 0] += 1
        return self.sym_encryptor.encrypt_symmetric(self.encode(values))

    def encrypt_bytes(self, values) -> bytes:
        """``values`` encrypted by :meth:`encrypt_seeded`, serialized for sending."""
        return self._dump(self.encrypt_seeded(values))

    def encrypt_plaintext_bytes(self, pt: sa.Plaintext) -> bytes:
        """A prepared plaintext, encrypted like :meth:`encrypt_seeded` and serialized."""
        if self.sym_encryptor is None:
            raise KeyMaterialError("secret-key encryption needs a hospital's secret key")
        self.counts["encrypt", 0] += 1
        return self._dump(self.sym_encryptor.encrypt_symmetric(pt))

    def decrypt(self, v: SealVec) -> np.ndarray:
        """Decrypt ``v`` to one float64 value per slot (needs the secret key)."""
        if self.decryptor is None:
            raise KeyMaterialError("decryption needs a hospital's secret key")
        pt = sa.Plaintext()
        self.counts["decrypt", self.level(v.ct)] += 1
        self.decryptor.decrypt(v.ct, pt)
        return np.asarray(self.encoder.decode_double(pt), dtype=np.float64)

    # -- helpers ----------------------------------------------------------------------------
    def level(self, ct: sa.Ciphertext) -> int:
        """0 = top level; grows with every rescale."""
        return self.parms_ids.index(tuple(ct.parms_id()))

    def align(self, a: sa.Ciphertext, b: sa.Ciphertext) -> tuple[sa.Ciphertext, sa.Ciphertext]:
        """Copies of a and b at the lower of their levels, with equal (nominal) scales."""
        la, lb = self.level(a), self.level(b)
        if la < lb:
            a = self._switch(a, b.parms_id())
        elif lb < la:
            b = self._switch(b, a.parms_id())
        return a, b

    def _switch(self, ct: sa.Ciphertext, parms_id) -> sa.Ciphertext:
        out = sa.Ciphertext()
        self.ev.mod_switch_to(ct, parms_id, out)
        return out

    def rescale(self, ct: sa.Ciphertext) -> sa.Ciphertext:
        """Rescale ``ct`` in place to the next level, keeping the nominal scale; returns ``ct``."""
        self.counts["rescale", self.level(ct)] += 1
        self.ev.rescale_to_next_inplace(ct)
        ct.scale = self.scale  # primes are ~2^scale_bits: keep the nominal scale (as TenSEAL)
        return ct

    def dot(
        self, pairs: Sequence[tuple[SealVec, SealVec]], rescale: bool = True, relin: bool = True
    ) -> SealVec:
        """``sum a * b`` with one relinearization and one rescale (unless told not to: a sum
        left unrelinearized can take more products, then :meth:`relinearize`)."""
        acc = None
        tmp = sa.Ciphertext()
        for a, b in pairs:
            x, y = self.align(a.ct, b.ct)
            self.counts["mul_ct", self.level(x)] += 1
            if acc is None:
                acc = sa.Ciphertext()
                self.ev.multiply(x, y, acc)
            else:
                self.ev.multiply(x, y, tmp)
                self.ev.add_inplace(acc, tmp)
        if relin:
            acc = self.relinearize(SealVec(self, acc)).ct
        return SealVec(self, self.rescale(acc) if rescale else acc)

    def relinearize(self, v: SealVec) -> SealVec:
        """``v`` relinearized in place (and returned); a two-component ``v`` as it is."""
        if v.ct.size() == 2:
            return v
        self.counts["relin", self.level(v.ct)] += 1
        self.ev.relinearize_inplace(v.ct, self.relin)
        return v

    def rotate(self, v: SealVec, step: int) -> SealVec:
        """``v`` rotated by ``step`` slots (``rot(v, k)[i] = v[i + k]``); needs Galois keys."""
        if self.galois is None:
            raise KeyMaterialError("this party holds no Galois keys")
        out = sa.Ciphertext()
        self.counts["rotate", self.level(v.ct)] += 1
        self.ev.rotate_vector(v.ct, step, self.galois, out)
        return SealVec(self, out)

    def mod_switch_to_level(self, v: SealVec, level: int) -> SealVec:
        """``v`` mod-switched down to ``level`` (``v`` itself if it is already there)."""
        if self.level(v.ct) == level:
            return v
        return SealVec(self, self._switch(v.ct, list(self.parms_ids[level])))

    def close(self) -> None:
        """Close the scratch files now (the kernel frees them at exit in any case on Linux)."""
        for scratch in self._scratch.values():
            scratch.close()
        self._scratch = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class SealVec:
    """A ciphertext that behaves like a numpy slot vector under ``+ - *``."""

    __slots__ = ("engine", "ct")

    def __init__(self, engine: SealEngine, ct: sa.Ciphertext) -> None:
        self.engine = engine
        self.ct = ct

    def _plain(self, other) -> sa.Plaintext:
        return self.engine.encode(other, self.ct.parms_id(), self.ct.scale)

    def __add__(self, other) -> SealVec:
        e, out = self.engine, sa.Ciphertext()
        if isinstance(other, SealVec):
            a, b = e.align(self.ct, other.ct)
            b.scale = a.scale
            e.ev.add(a, b, out)
        else:
            e.ev.add_plain(self.ct, self._plain(other), out)
        return SealVec(e, out)

    __radd__ = __add__

    def __neg__(self) -> SealVec:
        out = sa.Ciphertext()
        self.engine.ev.negate(self.ct, out)
        return SealVec(self.engine, out)

    def __sub__(self, other) -> SealVec:
        if isinstance(other, SealVec):
            return self + (-other)
        return self + (-np.asarray(other, dtype=np.float64) if not np.isscalar(other) else -other)

    def __rsub__(self, other) -> SealVec:
        return (-self) + other

    def __mul__(self, other) -> SealVec:
        e, out = self.engine, sa.Ciphertext()
        if isinstance(other, SealVec):
            a, b = e.align(self.ct, other.ct)
            e.counts["mul_ct", e.level(a)] += 1
            e.counts["relin", e.level(a)] += 1
            e.ev.multiply(a, b, out)
            e.ev.relinearize_inplace(out, e.relin)
        else:
            pt = e.encode(other, self.ct.parms_id(), e.scale)
            e.counts["mul_plain", e.level(self.ct)] += 1
            e.ev.multiply_plain(self.ct, pt, out)
        return SealVec(e, e.rescale(out))

    __rmul__ = __mul__

    @property
    def level(self) -> int:
        """The ciphertext's level: 0 at the top, one more per rescale."""
        return self.engine.level(self.ct)
