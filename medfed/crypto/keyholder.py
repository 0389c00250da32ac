"""The hospital's side of a refresh round: decrypt masked values, sum, re-encrypt.

The hospital sees only slots that the aggregator masked with fresh uniform noise, so it
learns nothing about the model or the gradients; its fresh encryptions restore every level.
"""

from __future__ import annotations

import numpy as np
import tenseal as ts

from medfed.crypto.context import CiphertextError, decrypt, encrypt, load_ciphertext
from medfed.crypto.packing import SlotLayout, replicate, segment_sums
from medfed.crypto.params import CKKSParams


def sum_masked_slots(
    ctx: ts.Context, masked: list[bytes], layout: SlotLayout, params: CKKSParams
) -> list[bytes]:
    """Encrypted, replicated segment sums of each masked vector."""
    bound = 2.0 ** (params.mask_bits + 2)
    out = []
    for j, blob in enumerate(masked):
        vec = load_ciphertext(ctx, blob, size=layout.slots, sender="aggregator", item=f"masked {j}")
        values = decrypt(ctx, vec)
        if not np.all(np.isfinite(values)) or np.max(np.abs(values)) > bound:
            raise CiphertextError(
                f"masked vector {j} from the aggregator decrypts outside the mask range: it was "
                "not encrypted under this consortium's key, or it is corrupt; the aggregator "
                "must resend values encrypted under the shared public key."
            )
        sums = segment_sums(values, layout)
        out.append(encrypt(ctx, replicate(sums, layout)).serialize())
    return out
