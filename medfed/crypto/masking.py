"""Additive masks for the aggregator's refresh rounds.

The aggregator adds fresh uniform noise to every slot before a hospital decrypts, so the
hospital sees only masked values (statistical hiding: a slot value of magnitude ``v`` is hidden
behind a mask uniform on ``[-2**mask_bits, 2**mask_bits]``: statistical distance
``|v| / 2**(mask_bits + 1)`` per slot, which adds up over every slot a hospital sees).
The aggregator removes the masks' image under the same linear map from the hospital's reply.
"""

from __future__ import annotations

import secrets

import numpy as np


def mask_rng() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG; masks must never reuse a run seed."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def draw_mask(rng: np.random.Generator, slots: int, mask_bits: int) -> np.ndarray:
    """Uniform mask in ``[-2**mask_bits, 2**mask_bits]`` for one slot vector."""
    bound = float(2**mask_bits)
    return rng.uniform(-bound, bound, size=slots)
