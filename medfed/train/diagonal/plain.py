"""The plaintext backend: the encrypted epoch's arithmetic on numpy slot vectors."""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, rot
from medfed.train.diagonal.backend import bias_products, group_products
from medfed.train.diagonal.keyholder import keyholder_sums


class PlainDiagonalBackend:
    """numpy slot vectors: the plaintext reference of the encrypted diagonal path."""

    def __init__(self, layout: DiagonalLayout) -> None:
        self.layout = layout

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

    def sum_round(self, parts, step, weights=None, decay=0.0):
        """The key holder's map (:func:`keyholder_sums`) of the summed products, unmasked."""
        L = self.layout
        upd_w, upd_b = [], []
        for k in range(L.n_heads):
            q = np.stack([sum(group_products(parts, k, g)) for g in range(L.n_groups)])
            wk = np.stack(weights[k]) if weights is not None else None
            pattern, bias = keyholder_sums(q, sum(bias_products(parts, k)), L, wk, decay)
            upd_w.append(list(pattern))
            upd_b.append(bias)
        return upd_w, upd_b
