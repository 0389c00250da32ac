"""The key holder's side of the masked refresh: the linear map from products to updates.

:func:`keyholder_sums` is the plain map (the plaintext backend applies it unmasked);
:func:`hospital_sums` is what a key-holding hospital runs on the aggregator's masked
ciphertexts: decrypt the exact integers, check, map, re-encrypt
(:meth:`medfed.crypto.refresh.Refresh.open_and_map`). Both maps are sums of slot rotations:
:func:`pattern_map` for the products, :func:`bias_map` for the bias.
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, gradient_map, weight_pattern


def pattern_map(layout: DiagonalLayout) -> tuple[int, int]:
    """``(unit, count)``: a folded product's per-feature sums repeated in the weight pattern
    are the sum of its rotations by multiples of the group width."""
    return layout.group, layout.slots // layout.group


def bias_map(layout: DiagonalLayout) -> tuple[int, int]:
    """``(unit, count)``: the bias product's total in every slot is the sum of all rotations."""
    return 1, layout.slots


def keyholder_sums(q: np.ndarray, qb: np.ndarray, layout: DiagonalLayout) -> tuple:
    """Plain linear map from (masked) products to pattern updates: what a hospital computes."""
    pattern = weight_pattern(gradient_map(q, layout), layout)
    return pattern, np.full(layout.slots, float(np.sum(qb)))


def hospital_sums(engine, masked: list[bytes], layout: DiagonalLayout) -> list[bytes]:
    """The key holder's side of the round: per masked vector, decrypt exactly, map, re-encrypt.

    Per head the aggregator sends one masked (folded) product vector per group and one masked
    bias vector. The reply is one pattern ciphertext per group and one replicated bias
    ciphertext per head, at the top level.
    """
    from medfed.crypto.context import CiphertextError
    from medfed.crypto.refresh import Refresh

    H, G = layout.n_heads, layout.n_groups
    per_head = G + 1
    if len(masked) != per_head * H:
        raise CiphertextError(
            f"the aggregator sent {len(masked)} masked vectors; expected {G} group products "
            f"plus one bias vector per head ({H} heads): {per_head * H}"
        )
    refresh = Refresh(engine)
    out = []
    for j, blob in enumerate(masked):
        head, slot = divmod(j, per_head)
        v = engine.from_bytes(blob, sender="aggregator", item=f"masked {head}/{slot}")
        unit, count = bias_map(layout) if slot == G else pattern_map(layout)
        out.append(refresh.open_and_map(v, unit, count))
    return out
