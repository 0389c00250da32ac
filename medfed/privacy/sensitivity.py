"""Mode "embeddings"' output perturbation: the L2 sensitivity of the trained head, by construction.

The aggregator runs ``T`` epochs of full-batch gradient descent from zero on
``F(theta) = (1/n) sum_i l(theta . x_i, y_i) + (l2/2) |theta|^2`` (``theta``: the weights and
the bias, both penalized; ``x_i``: a hospital's feature row, clipped to norm ``clip``, with the
bias input 1; ``n``: the padded sample count, public), where ``l`` is the loss whose derivative
in ``z`` is the polynomial residual ``p(z) - y``. :func:`head_bound` proves what the
sensitivity needs from the polynomial alone:

* ``p`` is increasing on ``[-radius, radius]`` (``radius``: where ``p'`` first reaches 0,
  within the fit's range), so ``l`` is convex there with curvature at most ``slope``, and
  ``|p(z) - y| <= residual = p(radius)`` for ``y`` in ``{0, 1}``.
* With ``l2 >= input_norm^2 * residual / radius`` the ball ``|theta| <= input_norm *
  residual / l2`` is invariant under the step (from zero), so every ``|z| <= radius`` on both
  neighbouring data sets: the bounds above hold at every step.
* With ``lr * (slope * input_norm^2 + 2 l2) <= 2`` the step is a ``(1 - lr * l2)``-contraction
  on that ball, and replacing one record moves each step's gradient by at most
  ``2 * input_norm * residual / n``. Summed over ``T`` contracting steps (Wu et al.,
  "Bolt-on differential privacy", SIGMOD 2017):
  ``|theta_T - theta'_T| <= 2 * input_norm * residual * (1 - (1 - lr * l2)^T) / (n * l2)``
  per head; ``sqrt(heads)`` times that over all heads.

The Gaussian noise of that sensitivity, added once to the final head, is one Gaussian
mechanism. Exact arithmetic is assumed: CKKS's approximation error (about ``2^-20`` of the
values) is not part of the bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medfed.errors import MedfedError


class SensitivityError(MedfedError, ValueError):
    """The schedule breaks an assumption of the sensitivity bound."""


@dataclass(frozen=True)
class HeadBound:
    """What the sensitivity of the polynomial-sigmoid head depends on (see the module)."""

    clip: float  # feature rows have L2 norm at most this (the bias input 1 comes on top)
    radius: float  # the polynomial is increasing on [-radius, radius]
    residual: float  # |p(z) - y| <= residual there, y in {0, 1}
    slope: float  # 0 <= p'(z) <= slope there

    @property
    def input_norm(self) -> float:
        """The norm bound of a row with its bias input: ``sqrt(clip^2 + 1)``."""
        return math.sqrt(self.clip**2 + 1.0)

    @property
    def min_l2(self) -> float:
        """The smallest L2 penalty that keeps every ``|z|`` within :attr:`radius`."""
        return self.input_norm**2 * self.residual / self.radius

    def max_lr(self, l2: float) -> float:
        """The largest step that is a contraction under ``l2``."""
        return 2.0 / (self.slope * self.input_norm**2 + 2.0 * l2)

    def weight_radius(self, l2: float) -> float:
        """The invariant ball's radius: ``|theta|`` never exceeds it (per head)."""
        return self.input_norm * self.residual / l2

    def check(self, lr: float, l2: float) -> None:
        """Raise :class:`SensitivityError`, naming the fix, if ``lr``/``l2`` break the bound."""
        if l2 < self.min_l2 * (1 - 1e-12):
            raise SensitivityError(
                f"l2={l2:g} is below {self.min_l2:.4g}, the penalty that keeps the polynomial "
                f"sigmoid on [-{self.radius:.3g}, {self.radius:.3g}] with features clipped to "
                f"{self.clip:g}; use --l2 {self.min_l2:.4g} or more (or a smaller --dp-clip)"
            )
        if lr > self.max_lr(l2) * (1 + 1e-12):
            raise SensitivityError(
                f"lr={lr:g} is above {self.max_lr(l2):.4g}, the largest step that contracts "
                f"with l2={l2:g}; use --lr {self.max_lr(l2):.4g} or less"
            )

    def sensitivity(self, lr: float, l2: float, epochs: int, n: int, heads: int) -> float:
        """L2 sensitivity of all heads after ``epochs`` steps on ``n`` (padded) samples."""
        self.check(lr, l2)
        if n < 1 or heads < 1 or epochs < 1:
            raise SensitivityError(f"need n, heads, epochs >= 1, got {n}, {heads}, {epochs}")
        per_head = 2 * self.input_norm * self.residual * (1 - (1 - lr * l2) ** epochs)
        return math.sqrt(heads) * per_head / (n * l2)

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json entry (with the derived bounds)."""
        return asdict(self) | {"input_norm": self.input_norm, "min_l2": self.min_l2}


@dataclass(frozen=True)
class OutputNoise:
    """Mode "embeddings"' DP at the aggregator: Gaussian noise of ``noise_multiplier`` times
    the head's sensitivity, added once inside the final head's ciphertexts."""

    noise_multiplier: float
    bound: HeadBound

    def std(self, lr: float, l2: float, epochs: int, n: int, heads: int) -> float:
        """The noise per weight (and bias) for this schedule on ``n`` padded samples."""
        return self.noise_multiplier * self.bound.sensitivity(lr, l2, epochs, n, heads)


def head_bound(coeffs: tuple[float, ...], fit_radius: float, clip: float) -> HeadBound:
    """The :class:`HeadBound` of the odd polynomial ``coeffs`` (``a0, a1, ...``, ``a0 = 1/2``)
    fitted on ``[-fit_radius, fit_radius]``, for features clipped to ``clip``.

    ``p'(z)`` is a polynomial in ``u = z^2``; its first positive root (if below
    ``fit_radius^2``) ends the increasing range, and its maximum on the range is at an end or
    at the one critical point of a quadratic in ``u``: both exact, no sampling.
    """
    if not clip > 0 or not math.isfinite(clip):
        raise SensitivityError(f"the feature clip must be positive and finite, got {clip!r}")
    a = np.zeros(6)
    a[: len(coeffs)] = coeffs
    if a[0] != 0.5 or np.any(a[2::2] != 0):
        raise SensitivityError("the sigmoid polynomial must be 1/2 plus odd powers")
    if not a[1] > 0:
        raise SensitivityError("the sigmoid polynomial must increase at 0")
    deriv_u = np.array([a[1], 3 * a[3], 5 * a[5]])  # p'(z) = d0 + d1 u + d2 u^2, u = z^2
    top = fit_radius**2
    roots = np.roots(deriv_u[::-1]) if np.any(deriv_u[1:]) else np.array([])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-12 and 0 < r.real < top]
    u_end = min(real, default=top)
    candidates = [0.0, u_end]
    if deriv_u[2] != 0:
        vertex = -deriv_u[1] / (2 * deriv_u[2])
        if 0 < vertex < u_end:
            candidates.append(vertex)
    slope = max(float(np.polyval(deriv_u[::-1], u)) for u in candidates)
    radius = math.sqrt(u_end)
    residual = float(np.polynomial.polynomial.polyval(radius, a))  # p(radius) = 1 - p(-radius)
    return HeadBound(float(clip), radius, residual, slope)


def clip_rows(x: np.ndarray, clip: float) -> np.ndarray:
    """Rows of ``x`` with L2 norm above ``clip`` scaled down to ``clip`` (a per-record map)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    factor = np.minimum(1.0, clip / np.maximum(norms, np.finfo(float).tiny))
    return x * factor
