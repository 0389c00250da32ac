"""TenSEAL contexts per role, and ciphertext (de)serialization with boundary checks.

A hospital holds a *secret* context; the aggregator and its workers hold only the *public*
context (public key + relinearization keys; Galois keys for three rotation steps travel
separately, see :mod:`medfed.crypto.seal`).
Ciphertexts travel as bytes; every load is checked so that malformed, foreign or mis-sized
ciphertexts are rejected with an error that names the sender and the item.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import tenseal as ts

from medfed.crypto.errors import CiphertextError, KeyMaterialError
from medfed.crypto.params import CKKSParams

#: Refuse single ciphertext payloads larger than this (an N=32768 fresh ciphertext is ~4 MB).
MAX_CIPHERTEXT_BYTES = 16 * 2**20


def make_secret_context(params: CKKSParams) -> ts.Context:
    """A fresh key pair for the hospitals (shared-key setup)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = params.scale
    return ctx


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """Serialize a hospital's context, secret key included (never send this to the aggregator)."""
    if not ctx.is_private():
        raise KeyMaterialError("this context holds no secret key")
    return ctx.serialize(save_secret_key=True)


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The aggregator's view: public and relinearization keys, never the secret key."""
    return ctx.serialize(save_secret_key=False, save_galois_keys=False)


def load_secret_context(data: bytes) -> ts.Context:
    """Load a hospital's serialized context; refuse one that holds no secret key."""
    ctx = ts.context_from(data)
    if not ctx.is_private():
        raise KeyMaterialError("expected a hospital's secret context, got a public one")
    return ctx


def load_public_context(data: bytes, sender: str = "hospital") -> ts.Context:
    """Load the aggregator's context; refuse anything that carries a secret key."""
    try:
        ctx = ts.context_from(data)
    except Exception as e:  # noqa: BLE001 - SEAL raises many types
        raise CiphertextError(
            f"public context from {sender} is malformed ({e}); resend the key-setup message."
        ) from None
    if ctx.is_private():
        raise KeyMaterialError(
            f"the context sent by {sender} contains a secret key; the aggregator must only "
            "receive public_context_bytes(ctx)."
        )
    return ctx


def context_fingerprint(ctx: ts.Context) -> str:
    """Short stable id of a key set (hash of the public key), to detect foreign key sets.

    Serialized contexts are not comparable (relinearization keys are re-sampled when a secret
    context is loaded), so the fingerprint hashes the public key alone.
    """
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pk")
        ctx.public_key().data.save(path)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]


def encrypt(ctx: ts.Context, values: np.ndarray) -> ts.CKKSVector:
    """Encrypt a vector of floats (cast to float64) as one CKKS ciphertext under ``ctx``."""
    return ts.ckks_vector(ctx, np.asarray(values, dtype=np.float64).tolist())


def load_ciphertext(
    ctx: ts.Context, data: bytes, *, size: int, sender: str, item: str
) -> ts.CKKSVector:
    """Deserialize one ciphertext and check it fits this context and the expected size."""
    if not isinstance(data, bytes | bytearray):
        raise CiphertextError(f"{item} from {sender}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_CIPHERTEXT_BYTES:
        raise CiphertextError(
            f"{item} from {sender} is {len(data)} bytes, over the {MAX_CIPHERTEXT_BYTES}-byte "
            "limit for one ciphertext; the sender must use this run's CKKS parameters."
        )
    try:
        vec = ts.ckks_vector_from(ctx, bytes(data))
        got = vec.size()
    except Exception as e:  # noqa: BLE001
        raise CiphertextError(
            f"{item} from {sender} is not a valid ciphertext for this run's context ({e}); "
            "the sender must encrypt with the run's shared public key and parameters."
        ) from None
    if got != size:
        raise CiphertextError(
            f"{item} from {sender} has {got} slots, expected {size}; the sender must use the "
            "slot layout announced for this round."
        )
    _check_parms_match(ctx, vec, sender=sender, item=item)
    return vec


def _check_parms_match(ctx: ts.Context, vec: ts.CKKSVector, *, sender: str, item: str) -> None:
    """A ciphertext under another parameter set has a parms_id outside this context's chain."""
    ids = set()
    data = ctx.data.seal_context().first_context_data()
    while data is not None:
        ids.add(tuple(data.parms_id()))
        data = data.next_context_data()
    if tuple(vec.data.ciphertext()[0].parms_id()) not in ids:
        raise CiphertextError(
            f"{item} from {sender} was made under different CKKS parameters; re-encrypt "
            "with this run's context."
        )


def decrypt(ctx: ts.Context, vec: ts.CKKSVector) -> np.ndarray:
    """Decrypt ``vec`` with the secret key of a hospital's context, as a float64 array."""
    if not ctx.is_private():
        raise KeyMaterialError("decryption needs a hospital's secret context")
    return np.asarray(vec.decrypt(ctx.secret_key()), dtype=np.float64)
