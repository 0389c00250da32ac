"""The key holder's side of the masked-sum round: the linear map from products to updates.

:func:`keyholder_sums` is the plain map (the plaintext backend applies it unmasked);
:func:`hospital_sums` is what a key-holding hospital runs on the aggregator's masked
ciphertexts: decrypt, check, map, re-encrypt.
"""

from __future__ import annotations

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, gradient_map, weight_pattern


def keyholder_sums(
    q: np.ndarray,
    qb: np.ndarray,
    layout: DiagonalLayout,
    weights: np.ndarray | None = None,
    decay: float = 0.0,
) -> tuple:
    """Plain linear map from (masked) products to pattern updates: what a hospital computes.

    ``weights``: the (masked) weight patterns ``(groups, slots)``; ``decay * weights`` (the L2
    penalty's step) is added to the weight updates.
    """
    grads = gradient_map(q, layout)
    pattern = weight_pattern(grads, layout)
    if weights is not None:
        pattern = pattern + decay * np.asarray(weights)
    return pattern, np.full(layout.slots, float(np.sum(qb)))


def hospital_sums(
    engine, masked: list[bytes], layout: DiagonalLayout, mask_bits: int, decay: float = 0.0
) -> list[bytes]:
    """The key holder's side of the round: decrypt masked products, sum, re-encrypt.

    Per head the aggregator sends one masked (folded) product vector per group and one masked
    bias vector; with an L2 penalty (``decay > 0``) then, per head, the masked weight pattern
    of each group. The reply is one pattern ciphertext per group and one replicated bias
    ciphertext per head.
    """
    from medfed.crypto.context import CiphertextError

    H, G = layout.n_heads, layout.n_groups
    per_head = G + 1
    expected = per_head * H + (G * H if decay else 0)
    if not 0 <= decay < 1:
        raise CiphertextError(f"the aggregator asked for a weight decay of {decay}, not in [0, 1)")
    if len(masked) != expected:
        raise CiphertextError(
            f"the aggregator sent {len(masked)} masked vectors; expected {G} group products "
            f"plus one bias vector per head ({H} heads)"
            + (f", and {G} weight patterns per head" if decay else "")
            + f": {expected}"
        )
    bound = 2.0 ** (mask_bits + 3)

    def opened(blobs: list[bytes], what: str) -> np.ndarray:
        values = np.stack(
            [
                engine.decrypt(engine.from_bytes(b, sender="aggregator", item=f"{what}/{i}"))
                for i, b in enumerate(blobs)
            ]
        )
        if not np.all(np.isfinite(values)) or np.abs(values).max() > bound:
            raise CiphertextError(
                "masked values from the aggregator decrypt outside the mask range: not "
                "encrypted under this consortium's key, or corrupt."
            )
        return values

    out = []
    for k in range(H):
        values = opened(masked[k * per_head : (k + 1) * per_head], f"masked {k}")
        weights = None
        if decay:
            start = per_head * H + k * G
            weights = opened(masked[start : start + G], f"masked weights {k}")
        pattern, bias = keyholder_sums(values[:-1], values[-1], layout, weights, decay)
        out.extend(engine.encrypt_bytes(p) for p in pattern)
        out.append(engine.encrypt_bytes(bias))
    return out
