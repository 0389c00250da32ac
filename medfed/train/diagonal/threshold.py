"""The aggregator's backend under threshold keys: the epoch on joint-key ciphertexts (OpenFHE).

:class:`ThresholdDiagonalBackend` runs the same diagonal epoch as
:class:`~medfed.train.diagonal.encrypted.EncryptedDiagonalBackend` on
:class:`~medfed.crypto.threshold.evaluator.ThresholdVec` ciphertexts. Its round differs: the
aggregator applies the key holder's linear map itself (sums of rotations under the joint
rotation keys), then the updates are refreshed collectively to the top level by the hospitals
(``refresher``: every key share contributes; nobody decrypts them).
"""

from __future__ import annotations

import time
from typing import Protocol

from medfed.crypto.diagonal import DiagonalLayout, rotation_steps
from medfed.train.diagonal.backend import (
    bias_decay_share,
    bias_products,
    decay_share,
    group_products,
)
from medfed.train.diagonal.keyholder import pattern_map


class Refresher(Protocol):
    """Who refreshes: every key share's holder takes part (in process, or over Flower)."""

    def refresh(self, ciphertexts: list[bytes], step: int) -> list[bytes]:
        """Fresh top-level encryptions of the same values, in order."""


def threshold_rotation_steps(layout: DiagonalLayout) -> list[int]:
    """The rotations the threshold round needs keys for (:func:`rotation_steps_for_group`)."""
    return rotation_steps_for_group(layout.group, layout.baby, layout.slots)


def rotation_steps_for_group(group: int, baby: int, slots: int) -> list[int]:
    """The epoch's rotations and the powers of two of the linear map from the group width up
    (``group .. S/2``); the bias's sum within a group uses the epoch's ``-1 .. -group/2``."""
    multiples = [group << i for i in range((slots // group).bit_length() - 1)]  # g .. S/2
    return sorted(set(rotation_steps(group, baby)) | set(multiples))


class ThresholdDiagonalBackend:
    """The diagonal epoch on the joint keys; updates refreshed by ``refresher``."""

    def __init__(self, engine, layout: DiagonalLayout, refresher: Refresher) -> None:
        if engine.private:
            raise ValueError("the aggregator's backend must hold public material only")
        self.engine = engine
        self.layout = layout
        self.refresher = refresher
        self.records: list[dict] = []

    def zeros(self):
        """An encryption of zeros under the joint key."""
        return self.engine.encrypt(0.0)

    def dot(self, pairs, rescale=True, relin=True):
        """The engine's ``dot``."""
        return self.engine.dot(pairs, rescale, relin)

    def relinearize(self, v):
        """``v`` relinearized."""
        return self.engine.relinearize(v)

    def rescale(self, v):
        """``v`` (OpenFHE rescales itself)."""
        return self.engine.rescale(v)

    def rotate(self, v, step):
        """``v`` rotated by ``step`` slots."""
        return self.engine.rotate(v, step)

    def lower(self, v, like):
        """``v`` (OpenFHE aligns levels itself)."""
        return v

    def finish(self, q, qb):
        """The products as they are (the compute runs in the aggregator's process)."""
        return {"q": q, "qb": qb}

    def sum_round(self, parts, step, weights=None, decay=0.0, biases=None):
        """Updates from the summed products: the key holder's map applied by the aggregator
        (sums of rotations), then one collective refresh of every update vector."""
        t0 = time.perf_counter()
        L, e = self.layout, self.engine
        shrink = decay_share(L, weights, decay)
        shrink_b = bias_decay_share(L, biases, decay)
        unit, count = pattern_map(L)
        mapped = []
        for k in range(L.n_heads):
            for g in range(L.n_groups):
                q = _total(group_products(parts, k, g))
                if shrink:
                    q = q + weights[k][g] * shrink
                mapped.append(e.sum_rotations(q, unit, count))
            qb = _total(bias_products(parts, k))
            if shrink_b:
                qb = qb + biases[k] * shrink_b
            # the total in every slot: within each group by the epoch's negative steps, then
            # across groups as for the products (fewer rotation keys than bias_map's 1 .. S/2)
            within = e.sum_rotations(qb, -1, L.group)
            mapped.append(e.sum_rotations(within, unit, count))
        sent = [e.to_bytes(v) for v in mapped]
        fresh = [
            e.from_bytes(b, sender="refresh", item=f"refreshed update {j}")
            for j, b in enumerate(self.refresher.refresh(sent, step))
        ]
        if len(fresh) != len(mapped) or any(v.level != 0 for v in fresh):
            raise ValueError("the refresh must return one top-level ciphertext per update")
        per_head = L.n_groups + 1
        upd_w = [fresh[k * per_head : (k + 1) * per_head - 1] for k in range(L.n_heads)]
        upd_b = [fresh[(k + 1) * per_head - 1] for k in range(L.n_heads)]
        self.records.append(
            {
                "step": step,
                "refreshed": len(sent),
                "bytes_out": sum(len(b) for b in sent),
                "seconds": time.perf_counter() - t0,
            }
        )
        return upd_w, upd_b


def _total(vectors: list):
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total
