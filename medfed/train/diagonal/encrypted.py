"""The aggregator's CKKS backend and the Galois keys it needs.

:class:`EncryptedDiagonalBackend` holds the public key, relinearization and Galois keys (no
secret key); its :meth:`~EncryptedDiagonalBackend.sum_round` is the aggregator's side of the
masked-sum round (the key holder's side is :mod:`~medfed.train.diagonal.keyholder`).
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, gradient_map, rotation_steps, weight_pattern
from medfed.crypto.masking import draw_mask, mask_rng
from medfed.train.diagonal.backend import bias_products, group_products


class EncryptedDiagonalBackend:
    """The aggregator's CKKS backend: public key, relinearization and Galois keys (no secret)."""

    def __init__(self, engine, layout: DiagonalLayout, keyholder, mask_bits: int, rng=None):
        """``rng``: the mask stream (:class:`~medfed.crypto.masking.MaskStream`); default a
        fresh one keyed from the OS CSPRNG (pass a keyed one only to reproduce masks)."""
        if engine.private:
            raise ValueError("the aggregator's backend must be built on a public context")
        self.engine = engine
        self.layout = layout
        self.keyholder = keyholder
        self.mask_bits = mask_bits
        self.rng = rng if rng is not None else mask_rng()
        self.records: list[dict] = []

    def zeros(self):
        """An encryption of zeros."""
        return self.engine.encrypt(np.zeros(self.layout.slots))

    def dot(self, pairs, rescale=True, relin=True):
        """The sum of the ciphertext products of ``pairs`` (the engine's ``dot``)."""
        return self.engine.dot(pairs, rescale, relin)

    def relinearize(self, v):
        """``v`` relinearized."""
        return self.engine.relinearize(v)

    def rescale(self, v):
        """``v`` rescaled to the next level."""
        from medfed.crypto.seal import SealVec

        return SealVec(self.engine, self.engine.rescale(v.ct))

    def rotate(self, v, step):
        """``v`` rotated by ``step`` slots (chained from the Galois keys' steps)."""
        return self.engine.rotate(v, step)

    def lower(self, v, like):
        """``v`` mod-switched down to the level of ``like``."""
        return self.engine.mod_switch_to_level(v, like.level)

    def finish(self, q, qb):
        """Mask and serialize products where they were computed (a worker, or in-process).

        Returns the masked bytes (``{head: {group: bytes}}``, bias ``{head: bytes}``) and the
        masks' images under the key holder's linear map, so no unmasked product leaves the
        compute.
        """
        L, S, e = self.layout, self.layout.slots, self.engine
        out = {"q": {}, "qb": {}, "mask_pattern": {}, "mask_bias": {}}
        for k, per_group in q.items():
            masks = np.zeros((L.n_groups, S))
            for g in per_group:
                masks[g] = draw_mask(self.rng, S, self.mask_bits)
            out["q"][k] = {g: e.to_bytes(v + masks[g]) for g, v in per_group.items()}
            out["mask_pattern"][k] = weight_pattern(gradient_map(masks, L), L)
        for k, v in qb.items():
            m = draw_mask(self.rng, S, self.mask_bits)
            out["qb"][k] = e.to_bytes(v + m)
            out["mask_bias"][k] = float(m.sum())
        return out

    def _group_sum(self, parts: list, k: int, g: int) -> bytes:
        """One masked vector per group: computes that share a group are added here."""
        return self._masked_sum(group_products(parts, k, g), f"masked products {k}/{g}")

    def _masked_sum(self, blobs: list, item: str) -> bytes:
        if len(blobs) == 1:
            return blobs[0]
        e = self.engine
        total = None
        for b in blobs:
            v = e.from_bytes(b, sender="worker", item=item)
            total = v if total is None else total + v
        return e.to_bytes(total)

    def sum_round(self, parts, step, weights=None, decay=0.0):
        """The masked-sum round: masked products (and, with an L2 penalty, masked weights) go
        to a key-holding hospital, whose encrypted linear map of them, less the masks' images,
        is the update."""
        import time

        from medfed.crypto.context import CiphertextError

        t0 = time.perf_counter()
        L, e, S = self.layout, self.engine, self.layout.slots
        masked, weight_masks = [], {}
        for k in range(L.n_heads):
            masked.extend(self._group_sum(parts, k, g) for g in range(L.n_groups))
            masked.append(self._masked_sum(bias_products(parts, k), f"masked bias {k}"))
        if weights is not None:  # after every product vector: the key holder's layout
            for k in range(L.n_heads):
                weight_masks[k] = [draw_mask(self.rng, S, self.mask_bits) for _ in weights[k]]
                masked.extend(
                    e.to_bytes(w + m) for w, m in zip(weights[k], weight_masks[k], strict=True)
                )
        per_head = L.n_groups + 1
        while True:  # a key holder whose reply is unusable is dropped; the next one retries
            replies, who = self.keyholder.sum_masked(masked, step, decay if weights else 0.0)
            try:
                if len(replies) != per_head * L.n_heads:
                    raise CiphertextError(
                        f"{who} returned {len(replies)} sums in the masked-sum round, expected "
                        f"{per_head * L.n_heads}; it must answer with one per masked vector group"
                    )
                loaded = [
                    e.from_bytes(r, sender=who, item=f"sum {j // per_head}/{j % per_head}")
                    for j, r in enumerate(replies)
                ]
                break
            except CiphertextError as err:
                reject = getattr(self.keyholder, "reject", None)
                if reject is None:
                    raise
                reject(who, str(err), step)
        upd_w, upd_b = [], []
        for k in range(L.n_heads):
            pattern = sum(p["mask_pattern"][k] for p in parts if k in p["mask_pattern"])
            if k in weight_masks:
                pattern = pattern + decay * np.stack(weight_masks[k])
            bias = np.full(L.slots, sum(p["mask_bias"][k] for p in parts if k in p["mask_bias"]))
            got = loaded[k * per_head : (k + 1) * per_head]
            upd_w.append([gv - p for gv, p in zip(got[:-1], pattern, strict=True)])
            upd_b.append(got[-1] - bias)
        n_weights = sum(len(v) for v in weight_masks.values())
        self.records.append(
            {
                "step": step,
                "hospital": who,
                # what the key holder decrypted, masked (the refresh security's slot count)
                "mask_bits": self.mask_bits,
                "masked": {
                    "products": L.n_heads * L.n_groups,
                    "bias": L.n_heads,
                    "weights": n_weights,
                },
                "masked_slots": len(masked) * S,
                "bytes_to_hospital": sum(len(b) for b in masked),
                "bytes_from_hospital": sum(len(b) for b in replies),
                "seconds": time.perf_counter() - t0,
            }
        )
        return upd_w, upd_b


def galois_steps(layout: DiagonalLayout) -> list[int]:
    """The only rotations the aggregator needs keys for; all others are chained from these."""
    return rotation_steps(layout.group, layout.baby)
