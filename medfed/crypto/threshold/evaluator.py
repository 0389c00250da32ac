"""The aggregator's evaluator on the joint keys: ciphertexts that behave like numpy slot vectors.

:class:`ThresholdEngine` wraps the aggregator's context once the joint evaluation keys are in it
(:meth:`~medfed.crypto.threshold.ThresholdAggregator.join_mult_key_shares`);
:class:`ThresholdVec` supports ``+ - *`` with other vectors, numpy arrays and scalars, as
:class:`medfed.crypto.seal.SealVec` does, so the diagonal training code runs unchanged on it.
OpenFHE's FIXEDAUTO scaling rescales and aligns levels itself: :meth:`ThresholdEngine.rescale`
and :meth:`~ThresholdEngine.mod_switch_to_level` have nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfed.crypto.threshold.aggregator import ThresholdAggregator
from medfed.crypto.threshold.errors import ThresholdError


class ThresholdVec:
    """An OpenFHE ciphertext under the joint key, with numpy-like ``+ - *``."""

    __slots__ = ("ct", "engine")

    def __init__(self, engine: ThresholdEngine, ct) -> None:
        self.engine = engine
        self.ct = ct

    def _other(self, other):
        if isinstance(other, ThresholdVec):
            return other.ct
        if np.isscalar(other):
            return float(other)
        return self.engine.encode(other)

    def __add__(self, other) -> ThresholdVec:
        return ThresholdVec(self.engine, self.engine.cc.EvalAdd(self.ct, self._other(other)))

    __radd__ = __add__

    def __sub__(self, other) -> ThresholdVec:
        return ThresholdVec(self.engine, self.engine.cc.EvalSub(self.ct, self._other(other)))

    def __rsub__(self, other) -> ThresholdVec:
        return (-self) + other

    def __neg__(self) -> ThresholdVec:
        return ThresholdVec(self.engine, self.engine.cc.EvalNegate(self.ct))

    def __mul__(self, other) -> ThresholdVec:
        return ThresholdVec(self.engine, self.engine.cc.EvalMult(self.ct, self._other(other)))

    __rmul__ = __mul__

    @property
    def level(self) -> int:
        """Levels consumed (OpenFHE's ``GetLevel``)."""
        return int(self.ct.GetLevel())


class ThresholdEngine:
    """Encrypt, compute and rotate under the joint keys (public material only).

    ``aggregator`` must know the joint public key and hold the joint evaluation keys; rotations
    are limited to the steps its keys were made for.
    """

    def __init__(self, aggregator: ThresholdAggregator) -> None:
        if aggregator.joint_public_key is None:
            raise ThresholdError("the engine needs the aggregator's joint public key")
        self.aggregator = aggregator
        self.context = aggregator.context
        self.cc = aggregator.context._cc
        self.slots = aggregator.context.slots
        self.steps = frozenset(getattr(aggregator, "rotation_steps", ()))
        self.bv = aggregator.context.params.key_switching == "BV"
        self.private = False

    def encode(self, values):
        """A plaintext of one value per slot (zero-padded)."""
        v = np.zeros(self.slots)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size > self.slots:
            raise ThresholdError(f"{values.size} values do not fit {self.slots} slots")
        v[: values.size] = values
        return self.cc.MakeCKKSPackedPlaintext(v.tolist())

    def encrypt(self, values) -> ThresholdVec:
        """Encrypt a scalar (in every slot) or one value per slot under the joint public key."""
        if np.isscalar(values):
            values = np.full(self.slots, float(values))
        return ThresholdVec(
            self, self.cc.Encrypt(self.aggregator.joint_public_key, self.encode(values))
        )

    def from_bytes(self, data: bytes, sender: str = "?", item: str = "ciphertext") -> ThresholdVec:
        """A ciphertext under the joint key; :class:`ThresholdError` naming sender and item."""
        ct = self.context._ciphertext(data, f"{item} from {sender}")
        if ct.GetKeyTag() != self.aggregator.joint_key_tag:
            raise ThresholdError(f"{item} from {sender} is not under the joint public key")
        return ThresholdVec(self, ct)

    def to_bytes(self, v: ThresholdVec) -> bytes:
        """OpenFHE's binary serialisation of ``v``."""
        return self.context._serialize(v.ct)

    def dot(
        self, pairs: Sequence[tuple[ThresholdVec, ThresholdVec]], rescale=True, relin=True
    ) -> ThresholdVec:
        """``sum a * b`` with one relinearization (none with ``relin=False``)."""
        acc = None
        for a, b in pairs:
            prod = self.cc.EvalMultNoRelin(a.ct, b.ct)
            acc = prod if acc is None else self.cc.EvalAdd(acc, prod)
        if acc is None:
            raise ThresholdError("dot() needs at least one pair")
        out = ThresholdVec(self, acc)
        return self.relinearize(out) if relin else out

    def relinearize(self, v: ThresholdVec) -> ThresholdVec:
        """``v`` with two elements (relinearized if it has three)."""
        if v.ct.NumberCiphertextElements() == 2:
            return v
        return ThresholdVec(self, self.cc.Relinearize(v.ct))

    def rescale(self, v: ThresholdVec) -> ThresholdVec:
        """``v`` itself: FIXEDAUTO rescales before the next product."""
        return v

    def mod_switch_to_level(self, v: ThresholdVec, level: int) -> ThresholdVec:
        """``v`` itself: FIXEDAUTO aligns levels in every operation."""
        return v

    def rotate(self, v: ThresholdVec, step: int) -> ThresholdVec:
        """``v`` rotated by ``step`` slots (``rot(v, k)[i] = v[i + k]``); needs its key.

        A degree-1 ciphertext is first multiplied by 1 (degree 2, the level is spent at the
        next rescale): BV key switching's noise, about 2^70, is lost below a degree-2 scale
        (2^118) but not below 2^59.
        """
        step = int(step) % self.slots
        step = step - self.slots if step > self.slots // 2 else step
        if step == 0:
            return v
        if step not in self.steps:
            raise ThresholdError(
                f"no joint rotation key for step {step} (keys: {sorted(self.steps)})"
            )
        ct = v.ct
        if self.bv and ct.GetNoiseScaleDeg() == 1:  # BV key switching adds noise ~2^70: it
            ct = self.cc.EvalMult(ct, 1.0)  # swamps a degree-1 message (2^59), not 2^118
        return ThresholdVec(self, self.cc.EvalRotate(ct, step))

    def sum_rotations(self, v: ThresholdVec, unit: int, count: int) -> ThresholdVec:
        """``sum_j rot(v, j * unit)`` for ``j < count`` (a power of two; ``unit`` may be
        negative): ``log2(count)`` rotations and additions."""
        if count < 1 or count & (count - 1):
            raise ThresholdError(f"count {count} must be a power of two")
        k = 1
        while k < count:
            v = v + self.rotate(v, unit * k)
            k *= 2
        return v
