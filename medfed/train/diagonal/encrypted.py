"""The aggregator's CKKS backend and the Galois keys it needs.

:class:`EncryptedDiagonalBackend` holds the public key, relinearization and Galois keys (no
secret key); its :meth:`~EncryptedDiagonalBackend.sum_round` is the aggregator's side of the
masked refresh (:mod:`medfed.crypto.refresh`; the key holder's side is
:mod:`~medfed.train.diagonal.keyholder`).
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, rotation_steps
from medfed.crypto.masking import MAX_MASK_PARTS, mask_key
from medfed.crypto.refresh import Refresh
from medfed.train.diagonal.backend import (
    bias_decay_share,
    bias_products,
    decay_share,
    group_products,
)
from medfed.train.diagonal.keyholder import bias_map, pattern_map


class EncryptedDiagonalBackend:
    """The aggregator's CKKS backend: public key, relinearization and Galois keys (no secret)."""

    def __init__(self, engine, layout: DiagonalLayout, keyholder, new_key=mask_key):
        """``new_key``: where mask keys come from (default: fresh from the OS CSPRNG; a test
        may pass its own to see the masks)."""
        if engine.private:
            raise ValueError("the aggregator's backend must be built on a public context")
        self.engine = engine
        self.layout = layout
        self.keyholder = keyholder
        self.refresh = Refresh(engine)
        self.new_key = new_key
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
        key and width of each mask (``keys``, ``bias_keys``), so no unmasked product leaves the
        compute and the aggregator can subtract the masks' images.
        """
        e = self.engine
        out = {"q": {}, "qb": {}, "keys": {}, "bias_keys": {}}
        for k, per_group in q.items():
            out["q"][k], out["keys"][k] = {}, {}
            for g, v in per_group.items():
                key = self.new_key()
                masked, bits = self.refresh.mask(v, key)
                out["q"][k][g], out["keys"][k][g] = e.to_bytes(masked), (key, bits)
        for k, v in qb.items():
            key = self.new_key()
            masked, bits = self.refresh.mask(v, key)
            out["qb"][k], out["bias_keys"][k] = e.to_bytes(masked), (key, bits)
        return out

    def _masked_sum(self, blobs: list, item: str, extra=None) -> bytes:
        """The sum of masked ciphertexts (and ``extra``, an unmasked term), serialized."""
        if len(blobs) == 1 and extra is None:
            return blobs[0]
        e = self.engine
        total = None
        for b in blobs:
            v = e.from_bytes(b, sender="worker", item=item)
            total = v if total is None else total + v
        if extra is not None:
            total = total + self.lower(extra, total)
        return e.to_bytes(total)

    def sum_round(self, parts, step, weights=None, decay=0.0, biases=None):
        """The masked refresh: masked products go to a key-holding hospital, whose top-level
        encryption of their per-feature sums, less the masks' images, is the update.

        With an L2 penalty, ``decay * g / S`` times each weight pattern joins its group's
        masked products (the key holder's sum over the ``S / g`` repeats makes it
        ``decay * w``), so weights are never sent to a hospital; with ``biases``, ``decay /
        S`` times each bias vector joins its masked bias products likewise.
        """
        import time

        from medfed.crypto.context import CiphertextError

        t0 = time.perf_counter()
        L, e = self.layout, self.engine
        G = L.n_groups
        if len(parts) > MAX_MASK_PARTS:
            raise ValueError(f"{len(parts)} computes returned products; at most {MAX_MASK_PARTS}")
        shrink = decay_share(L, weights, decay)
        shrink_b = bias_decay_share(L, biases, decay)
        masked = []
        for k in range(L.n_heads):
            for g in range(G):
                extra = weights[k][g] * shrink if shrink else None
                masked.append(
                    self._masked_sum(group_products(parts, k, g), f"masked products {k}/{g}", extra)
                )
            extra = biases[k] * shrink_b if shrink_b else None
            masked.append(self._masked_sum(bias_products(parts, k), f"masked bias {k}", extra))
        per_head = G + 1
        while True:  # a key holder whose reply is unusable is dropped; the next one retries
            replies, who = self.keyholder.sum_masked(masked, step)
            try:
                if len(replies) != per_head * L.n_heads:
                    raise CiphertextError(
                        f"{who} returned {len(replies)} sums in the masked-sum round, expected "
                        f"{per_head * L.n_heads}; it must answer with one per masked vector"
                    )
                loaded = [
                    e.from_bytes(r, sender=who, item=f"sum {j // per_head}/{j % per_head}")
                    for j, r in enumerate(replies)
                ]
                if any(v.level != 0 for v in loaded):
                    raise CiphertextError(f"{who} answered below the top level of the chain")
                break
            except CiphertextError as err:
                reject = getattr(self.keyholder, "reject", None)
                if reject is None:
                    raise
                reject(who, str(err), step)
        unit, count = pattern_map(L)
        upd_w, upd_b, bits = [], [], set()
        for k in range(L.n_heads):
            got = loaded[k * per_head : (k + 1) * per_head]
            row = []
            for g in range(G):
                keys = [p["keys"][k][g] for p in parts if g in p["keys"].get(k, {})]
                bits.update(b for _, b in keys)
                row.append(self.refresh.unmask(got[g], keys, unit, count))
            upd_w.append(row)
            keys = [p["bias_keys"][k] for p in parts if k in p["bias_keys"]]
            bits.update(b for _, b in keys)
            upd_b.append(self.refresh.unmask(got[-1], keys, *bias_map(L)))
        if len(bits) != 1:
            raise ValueError(f"the computes masked with several widths: {sorted(bits)}")
        self.records.append(
            {
                "step": step,
                "hospital": who,
                # what the key holder decrypted, masked (the refresh security's inputs)
                "mask_bits": bits.pop(),
                "scale": e.scale,
                "ring": self.refresh.n,
                "masked": {"products": L.n_heads * G, "bias": L.n_heads},
                "masked_coefficients": len(masked) * self.refresh.n,
                "bytes_to_hospital": sum(len(b) for b in masked),
                "bytes_from_hospital": sum(len(b) for b in replies),
                "seconds": time.perf_counter() - t0,
            }
        )
        return upd_w, upd_b


def galois_steps(layout: DiagonalLayout) -> list[int]:
    """The only rotations the aggregator needs keys for; all others are chained from these."""
    return rotation_steps(layout.group, layout.baby)
