"""Differential-privacy accounting for medfed's Gaussian mechanisms, with ``dp-accounting``.

Every DP mechanism in medfed adds Gaussian noise of standard deviation ``noise_multiplier *
sensitivity`` to a sum whose L2 sensitivity is bounded by construction, once per step, over
all the data (no subsampling: ``sample_rate`` 1). Composition over ``steps`` is accounted with
the privacy-loss-distribution (PLD) accountant, which is tight for the Gaussian mechanism; the
RDP accountant gives an upper bound that :func:`epsilon` can report beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medfed.errors import ConfigError

#: The PLD accountant's discretization: its epsilon is within ~1e-6 of the 1e-4 grid's here,
#: far below the reported precision (2 decimals), at a tenth of the cost.
_PLD_DISCRETIZATION = 1e-3
#: The least noise multiplier :func:`noise_multiplier_for` returns (an epsilon that needs less
#: is refused there).
MIN_NOISE_MULTIPLIER = 0.2


def _event(noise_multiplier: float, steps: int, sample_rate: float):
    import dp_accounting as dpa

    one = dpa.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        one = dpa.PoissonSampledDpEvent(sample_rate, one)
    return dpa.SelfComposedDpEvent(one, steps)


def _check(noise_multiplier: float, steps: int, delta: float, sample_rate: float) -> None:
    if not noise_multiplier > 0:
        raise ConfigError(f"the noise multiplier must be positive, got {noise_multiplier!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the number of noisy steps must be a positive integer, got {steps!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"the sample rate must be in (0, 1], got {sample_rate!r}")


def epsilon_of_releases(noise_multipliers: list[float], delta: float) -> float:
    """The PLD epsilon at ``delta`` of Gaussian releases with these (possibly different)
    noise multipliers, composed."""
    import dp_accounting as dpa
    from dp_accounting import pld

    if not noise_multipliers:
        raise ConfigError("no noisy release to account")
    for sigma in noise_multipliers:
        _check(sigma, 1, delta, 1.0)
    if len(set(noise_multipliers)) == 1:  # as calibrated: the same event, the same numbers
        return epsilon(noise_multipliers[0], len(noise_multipliers), delta)
    if min(noise_multipliers) < MIN_NOISE_MULTIPLIER:  # the PLD would not fit in memory
        from dp_accounting import rdp

        acc = rdp.RdpAccountant()
        acc.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(s) for s in noise_multipliers]))
        return float(acc.get_epsilon(delta))
    acc = pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    acc.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(s) for s in noise_multipliers]))
    return float(acc.get_epsilon(delta))


def epsilon(
    noise_multiplier: float,
    steps: int,
    delta: float,
    sample_rate: float = 1.0,
    accountant: str = "pld",
) -> float:
    """The epsilon at ``delta`` of ``steps`` Gaussian steps (``accountant`` "pld" or "rdp";
    below :data:`MIN_NOISE_MULTIPLIER` the PLD would not fit in memory and RDP's upper bound
    is returned)."""
    from dp_accounting import pld, rdp

    _check(noise_multiplier, steps, delta, sample_rate)
    if accountant == "pld" and noise_multiplier < MIN_NOISE_MULTIPLIER:
        accountant = "rdp"
    if accountant == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    elif accountant == "rdp":
        acc = rdp.RdpAccountant()
    else:
        raise ConfigError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
    acc.compose(_event(noise_multiplier, steps, sample_rate))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, steps: int, delta: float, sample_rate: float = 1.0
) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``steps`` steps reach ``target_epsilon``
    at ``delta`` under the PLD accountant; :class:`ConfigError` when even
    :data:`MIN_NOISE_MULTIPLIER` stays below it (the target is too large to mean much)."""
    if not target_epsilon > 0:
        raise ConfigError(f"the target epsilon must be positive, got {target_epsilon!r}")
    _check(1.0, steps, delta, sample_rate)
    if epsilon(MIN_NOISE_MULTIPLIER, steps, delta, sample_rate) <= target_epsilon:
        raise ConfigError(
            f"epsilon {target_epsilon:g} over {steps} steps needs a noise multiplier below "
            f"{MIN_NOISE_MULTIPLIER}: choose a smaller --dp-epsilon, or run without DP"
        )
    import dp_accounting as dpa
    from dp_accounting import pld

    sigma = float(
        dpa.calibrate_dp_mechanism(
            lambda: pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION),
            lambda sigma: _event(sigma, steps, sample_rate),
            target_epsilon,
            delta,
            dpa.LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 1.0),
            tol=1e-3,
        )
    )
    while epsilon(sigma, steps, delta, sample_rate) > target_epsilon:  # at the target's edge
        sigma *= 1.001
    return sigma


@dataclass(frozen=True)
class Guarantee:
    """What a run's DP noise buys: (epsilon, delta) over ``steps`` Gaussian steps."""

    noise_multiplier: float
    steps: int
    delta: float
    epsilon: float
    epsilon_rdp: float  # the RDP accountant's (looser) bound, for comparison
    sample_rate: float = 1.0

    @classmethod
    def of(cls, noise_multiplier: float, steps: int, delta: float) -> Guarantee:
        """Account ``steps`` full-data Gaussian steps of ``noise_multiplier``."""
        return cls(
            noise_multiplier,
            steps,
            delta,
            epsilon(noise_multiplier, steps, delta),
            epsilon(noise_multiplier, steps, delta, accountant="rdp"),
        )

    def to_dict(self) -> dict[str, float | int]:
        """The metrics.json ``dp`` block."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "epsilon_rdp": self.epsilon_rdp,
            "sample_rate": self.sample_rate,
        }


def analytic_gaussian_delta(eps: float, sigma: float) -> float:
    """Balle & Wang (ICML 2018), Theorem 8: the exact delta of one Gaussian mechanism with
    sensitivity 1 and noise ``sigma`` at ``eps``. (``steps`` Gaussian steps compose exactly to
    one with noise ``sigma / sqrt(steps)``.) For tests of the accountant."""
    from scipy.stats import norm

    a, b = -eps * sigma + 1 / (2 * sigma), -eps * sigma - 1 / (2 * sigma)
    return float(norm.cdf(a) - math.exp(eps) * norm.cdf(b))
