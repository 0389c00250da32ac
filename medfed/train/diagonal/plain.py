"""The plaintext backend: the encrypted epoch's arithmetic on numpy slot vectors."""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, rot
from medfed.crypto.masking import MASK_KINDS
from medfed.train.diagonal.backend import (
    bias_decay_share,
    bias_products,
    decay_share,
    group_products,
)
from medfed.train.diagonal.keyholder import keyholder_sums


class PlainDiagonalBackend:
    """numpy slot vectors: the plaintext reference of the encrypted diagonal path."""

    def __init__(self, layout: DiagonalLayout) -> None:
        self.layout = layout
        self.records: list[dict] = []  # per round: what the encrypted run would mask

    def zeros(self) -> np.ndarray:
        """A zero slot vector."""
        return np.zeros(self.layout.slots)

    def dot(self, pairs, rescale=True, relin=True):
        """The sum of the products of ``pairs``."""
        return sum(a * b for a, b in pairs)

    def relinearize(self, v):
        """``v`` itself (nothing to relinearize)."""
        return v

    def rescale(self, v):
        """``v`` itself (nothing to rescale)."""
        return v

    def rotate(self, v, step):
        """``v`` rotated by ``step`` slots (``np.roll``)."""
        return rot(v, step)

    def lower(self, v, like):
        """``v`` itself (no levels)."""
        return v

    def finish(self, q, qb):
        """The products as they are (nothing to mask)."""
        return {"q": q, "qb": qb}

    def sum_round(self, parts, step, weights=None, decay=0.0, biases=None):
        """The key holder's map (:func:`keyholder_sums`) of the summed products, unmasked.

        With ``weights``, ``decay * g / S`` times each weight pattern joins its group's
        products, as in the encrypted round (with ``biases``, ``decay / S`` times each bias
        vector joins its bias products). Records, per round, the vectors the encrypted run
        masks (per head: one product vector per group and the bias vector) and the sum of
        ``|z|`` over their slots, per kind: the refresh security's numerator
        (:func:`~medfed.crypto.masking.refresh_security`).
        """
        L = self.layout
        shrink = decay_share(L, weights, decay)
        shrink_b = bias_decay_share(L, biases, decay)
        upd_w, upd_b = [], []
        total, count = dict.fromkeys(MASK_KINDS, 0.0), dict.fromkeys(MASK_KINDS, 0)
        for k in range(L.n_heads):
            q = np.stack([sum(group_products(parts, k, g)) for g in range(L.n_groups)])
            if shrink:
                q = q + shrink * np.stack(weights[k])
            qb = sum(bias_products(parts, k))
            if shrink_b:
                qb = qb + shrink_b * biases[k]
            for kind, v in (("products", q), ("bias", qb)):
                total[kind] += float(np.abs(v).sum())
                count[kind] += len(v) if v.ndim == 2 else 1
            pattern, bias = keyholder_sums(q, qb, L)
            upd_w.append(list(pattern))
            upd_b.append(bias)
        self.records.append({"step": step, "abs": total, "vectors": count})
        return upd_w, upd_b
