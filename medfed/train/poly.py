"""Polynomial sigmoid approximations and their depth-optimal evaluation.

CKKS evaluates only additions and multiplications, so the logistic sigmoid is replaced by an
odd least-squares polynomial on ``[-radius, radius]`` (Kim et al., iDASH 2017). The same
:func:`scaled_residual` runs on numpy arrays (plaintext reference) and on ciphertexts
(:class:`medfed.crypto.seal.SealVec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

SUPPORTED_DEGREES = (1, 3, 5)


@dataclass(frozen=True)
class SigmoidApprox:
    """Odd polynomial ``0.5 + a1 z + a3 z^3 + a5 z^5`` fitted to the sigmoid."""

    degree: int
    radius: float
    coeffs: tuple[float, ...]  # a0, a1, a2, ... up to degree (even ones zero except a0)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """The polynomial evaluated at ``z`` (elementwise, on numpy values)."""
        return np.polynomial.polynomial.polyval(z, self.coeffs)

    @property
    def depth(self) -> int:
        """Multiplicative depth of one training step: z, the polynomial, and x * residual."""
        return 2 + math.ceil(math.log2(self.degree + 1))

    def max_error(self, n: int = 4001) -> float:
        """Largest absolute error against the sigmoid on ``n`` points of ``[-radius, radius]``."""
        z = np.linspace(-self.radius, self.radius, n)
        return float(np.max(np.abs(self(z) - 1.0 / (1.0 + np.exp(-z)))))


@cache
def fit_sigmoid(degree: int = 3, radius: float = 8.0) -> SigmoidApprox:
    """Least-squares odd fit of the sigmoid on ``[-radius, radius]``."""
    if degree not in SUPPORTED_DEGREES:
        raise ValueError(
            f"sigmoid degree {degree} is not supported; use one of {SUPPORTED_DEGREES}"
        )
    if not 0 < radius <= 32:
        raise ValueError(f"approximation radius {radius} must be in (0, 32]")
    z = np.linspace(-radius, radius, 4001)
    target = 1.0 / (1.0 + np.exp(-z)) - 0.5
    powers = list(range(1, degree + 1, 2))
    basis = np.stack([z**p for p in powers], axis=1)
    sol, *_ = np.linalg.lstsq(basis, target, rcond=None)
    coeffs = [0.5] + [0.0] * degree
    for p, c in zip(powers, sol, strict=True):
        coeffs[p] = float(c)
    return SigmoidApprox(degree, float(radius), tuple(coeffs))


def target_term(y, approx: SigmoidApprox, scale: float):
    """``scale * (a0 - y)``: the part of the residual that does not change between epochs."""
    return y * (-scale) + scale * approx.coeffs[0]


def scaled_residual(z, y, approx: SigmoidApprox, scale: float, term=None):
    """``scale * (sigmoid_approx(z) - y)`` with the fewest levels.

    Works on numpy arrays and on SealVec ciphertexts alike; ``z`` is one level down from fresh
    inputs, ``y`` is fresh. Depth above ``z``: 1 (degree 1), 2 (degree 3), 3 (degree 5).
    ``term``: :func:`target_term` of ``y``, when the caller keeps it between epochs.
    """
    a = approx.coeffs
    out = term if term is not None else target_term(y, approx, scale)
    out = out + z * (scale * a[1])
    if approx.degree >= 3:
        z2 = z * z
        out = out + (z * (scale * a[3])) * z2
        if approx.degree >= 5:
            z4 = z2 * z2
            out = out + (z * (scale * a[5])) * z4
    return out
