"""Key setup ``shared``: one TenSEAL CKKS key provisioned to every hospital (as in mode
"embeddings"); the aggregator holds the public context only. TenSEAL is imported only when
a cipher of this setup is used."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medfed.crypto.errors import CiphertextError
from medfed.fl import messages as M
from medfed.fl.ciphers.base import AggregatorCipher, Exchange, HospitalCipher
from medfed.fl.ciphers.framing import chunk_sizes, chunks, frame, unframe
from medfed.fl.ciphers.registry import register_key_setup


@lru_cache(maxsize=64)
def _secret_context(workspace: str, index: int):
    from medfed.crypto.context import load_secret_context
    from medfed.fl import workspace as W

    return load_secret_context(W.read_secret_context(Path(workspace), index))


def _slots(ctx) -> int:
    return ctx.data.seal_context().first_context_data().parms().poly_modulus_degree() // 2


class SharedKeyHospital(HospitalCipher):
    """keys "shared": TenSEAL CKKS under the consortium key every hospital was provisioned."""

    def __init__(self, workspace: str, index: int) -> None:
        self.ctx = _secret_context(workspace, index)
        self.slots = _slots(self.ctx)

    def setup(self, step: str, record: Mapping) -> dict:
        """Steps ``fingerprint`` and ``public_context`` (never the secret key)."""
        from medfed.crypto.context import context_fingerprint, public_context_bytes

        if step == "fingerprint":
            return {M.KEY_FINGERPRINT: context_fingerprint(self.ctx)}
        if step == "public_context":  # public + relinearization keys, never the secret key
            return {
                M.KEY_FINGERPRINT: context_fingerprint(self.ctx),
                M.PUBLIC_CONTEXT: public_context_bytes(self.ctx),
            }
        return super().setup(step, record)

    def encrypt(self, vector: np.ndarray) -> bytes:
        """The vector as framed CKKSVectors of at most ``slots`` values each."""
        from medfed.crypto.context import encrypt

        return frame([encrypt(self.ctx, c).serialize() for c in chunks(vector, self.slots)])

    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        """Decrypts the aggregate's ciphertexts with this hospital's secret key."""
        from medfed.crypto.context import decrypt, load_ciphertext

        parts = unframe(aggregate, sender="aggregator", item="aggregate")
        sizes = chunk_sizes(length, self.slots)
        if len(parts) != len(sizes):
            raise CiphertextError(f"the aggregate has {len(parts)} ciphertexts, not {len(sizes)}")
        out = [
            decrypt(self.ctx, load_ciphertext(self.ctx, p, size=s, sender="aggregator", item="sum"))
            for p, s in zip(parts, sizes, strict=True)
        ]
        return np.concatenate(out)[:length]


class SharedKeyAggregator(AggregatorCipher):
    """Loads the lead hospital's public context (refusing a secret key) and adds CKKSVectors."""

    name = "shared"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.ctx = None
        self.fingerprint: str | None = None

    def setup(self, exchange: Exchange, nodes: list[int], names: dict[int, str]) -> list[int]:
        """Loads the lead's public context; keeps the hospitals whose key fingerprint matches."""
        from medfed.crypto.context import context_fingerprint, load_public_context

        replies = exchange(
            "key-setup",
            {n: {M.SETUP_STEP: "fingerprint"} for n in nodes},
            M.MSG_KEY_SETUP,
        )
        for lead in sorted(replies):  # the first hospital that sends a usable public context
            extra = exchange(
                "public-context", {lead: {M.SETUP_STEP: "public_context"}}, M.MSG_KEY_SETUP
            )
            if lead in extra and M.PUBLIC_CONTEXT in extra[lead]:
                self.ctx = load_public_context(extra[lead][M.PUBLIC_CONTEXT], sender=names[lead])
                break
        if self.ctx is None:
            raise M.FederationError("no hospital sent the public context")
        self.fingerprint = context_fingerprint(self.ctx)
        self.slots = _slots(self.ctx)
        ok = [n for n in sorted(replies) if replies[n].get(M.KEY_FINGERPRINT) == self.fingerprint]
        self.key_ids = {"aggregator": self.fingerprint} | {
            names[n]: str(replies[n].get(M.KEY_FINGERPRINT)) for n in sorted(replies)
        }
        self.rejected = {
            n: "encrypts under a different key set than the lead hospital's public key; "
            "re-provision this hospital with the consortium's key."
            for n in sorted(replies)
            if n not in ok
        }
        return ok

    def _load(self, blob: bytes, *, sender: str, length: int) -> list:
        from medfed.crypto.context import load_ciphertext

        parts = unframe(blob, sender=sender)
        sizes = chunk_sizes(length, self.slots)
        if len(parts) != len(sizes):
            raise CiphertextError(
                f"update from {sender} has {len(parts)} ciphertexts, expected {len(sizes)}"
            )
        return [
            load_ciphertext(self.ctx, p, size=s, sender=sender, item="update")
            for p, s in zip(parts, sizes, strict=True)
        ]

    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        """Loads every ciphertext of ``blob`` under the public context (checked sizes)."""
        self._load(blob, sender=sender, length=length)

    def add(self, blobs: Sequence[bytes]) -> bytes:
        """The ciphertext-wise sum of the contributions, framed like one."""
        import tenseal as ts

        total = None
        for blob in blobs:
            loaded = [ts.ckks_vector_from(self.ctx, v) for v in unframe(blob)]
            total = loaded if total is None else [a + b for a, b in zip(total, loaded, strict=True)]
        return frame([v.serialize() for v in total])

    def public_parameters(self) -> dict:
        """The CKKS preset and the public-key fingerprint each party announced (the
        aggregator's: the lead's public context it holds)."""
        return {"ckks": self.settings.ckks, "key_by_party": dict(getattr(self, "key_ids", {}))}

    def describe(self) -> dict:
        """The key setup and its CKKS preset's parameters."""
        from medfed.crypto.params import get_preset

        return {"keys": "shared", "ckks": get_preset(self.settings.ckks).to_dict()}


register_key_setup("shared", SharedKeyHospital, SharedKeyAggregator)
