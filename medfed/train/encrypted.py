"""The aggregator's encrypted backend for :func:`medfed.train.head.train_head`.

Holds only the public context. Its one interactive operation, :meth:`sum_round`, masks the
per-slot gradient products with fresh randomness, asks a key holder (a hospital) for the
encrypted segment sums, and removes the masks' sums from the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import tenseal as ts

from medfed.crypto.context import encrypt, load_ciphertext
from medfed.crypto.masking import draw_mask, mask_rng
from medfed.crypto.packing import SlotLayout, replicate, segment_sums
from medfed.crypto.params import CKKSParams


class KeyHolder(Protocol):
    """Something that turns masked ciphertext bytes into encrypted, replicated segment sums."""

    def sum_masked(self, masked: list[bytes], step: int) -> tuple[list[bytes], str]:
        """Return the reply ciphertexts and the name of the hospital that answered."""


@dataclass
class RoundRecord:
    step: int
    hospital: str
    bytes_to_hospital: int
    bytes_from_hospital: int
    seconds: float


@dataclass
class EncryptedBackend:
    """CKKS slot vectors at the aggregator; never holds a secret key."""

    ctx: ts.Context
    params: CKKSParams
    layout: SlotLayout
    keyholder: KeyHolder
    rng: np.random.Generator = field(default_factory=mask_rng)
    records: list[RoundRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ctx.is_private():
            raise ValueError("the aggregator's backend must be built on a public context")

    def zeros(self) -> ts.CKKSVector:
        return encrypt(self.ctx, np.zeros(self.layout.slots))

    def sum_round(self, products: Sequence[ts.CKKSVector], step: int) -> list[ts.CKKSVector]:
        import time

        t0 = time.perf_counter()
        masks = [draw_mask(self.rng, self.layout.slots, self.params.mask_bits) for _ in products]
        masked = [(p + m.tolist()).serialize() for p, m in zip(products, masks, strict=True)]
        replies, who = self.keyholder.sum_masked(masked, step)
        if len(replies) != len(products):
            raise ValueError(
                f"{who} returned {len(replies)} sums for {len(products)} masked vectors"
            )
        out = []
        for j, (reply, m) in enumerate(zip(replies, masks, strict=True)):
            g = load_ciphertext(
                self.ctx, reply, size=self.layout.slots, sender=who, item=f"sum {j}"
            )
            out.append(g - replicate(segment_sums(m, self.layout), self.layout).tolist())
        self.records.append(
            RoundRecord(
                step=step,
                hospital=who,
                bytes_to_hospital=sum(len(b) for b in masked),
                bytes_from_hospital=sum(len(b) for b in replies),
                seconds=time.perf_counter() - t0,
            )
        )
        return out
