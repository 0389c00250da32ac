"""The DP accountant against the exact analytic Gaussian mechanism (Balle & Wang, ICML 2018)."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq

from medfed.errors import ConfigError
from medfed.privacy.accountant import (
    Guarantee,
    analytic_gaussian_delta,
    epsilon,
    noise_multiplier_for,
)


def _exact_epsilon(sigma: float, delta: float) -> float:
    return brentq(lambda e: analytic_gaussian_delta(e, sigma) - delta, 1e-6, 200)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (2.0, 1), (4.0, 20), (10.0, 50)])
def test_pld_epsilon_matches_the_analytic_gaussian_mechanism(sigma, steps):
    delta = 1e-5
    # steps Gaussian steps of noise sigma are one Gaussian step of noise sigma / sqrt(steps)
    exact = _exact_epsilon(sigma / math.sqrt(steps), delta)
    assert epsilon(sigma, steps, delta) == pytest.approx(exact, rel=0.01, abs=0.01)
    assert epsilon(sigma, steps, delta, accountant="rdp") >= exact  # an upper bound


def test_noise_for_a_target_epsilon_reaches_it():
    sigma = noise_multiplier_for(1.0, steps=20, delta=1e-5)
    assert epsilon(sigma, 20, 1e-5) == pytest.approx(1.0, abs=0.01)
    assert epsilon(sigma * 0.9, 20, 1e-5) > 1.0  # less noise does not reach it
    exact = _exact_epsilon(sigma / math.sqrt(20), 1e-5)
    assert exact == pytest.approx(1.0, abs=0.02)


def test_more_noise_or_fewer_steps_means_smaller_epsilon():
    assert epsilon(2.0, 10, 1e-5) < epsilon(1.0, 10, 1e-5)
    assert epsilon(2.0, 5, 1e-5) < epsilon(2.0, 10, 1e-5)
    g = Guarantee.of(2.0, 10, 1e-5)
    assert g.epsilon <= g.epsilon_rdp and g.to_dict()["steps"] == 10


@pytest.mark.parametrize(
    ("args", "match"),
    [((0.0, 1, 1e-5), "noise multiplier"), ((1.0, 0, 1e-5), "steps"), ((1.0, 1, 1.0), "delta")],
)
def test_bad_parameters_are_refused_with_the_fix(args, match):
    with pytest.raises(ConfigError, match=match):
        epsilon(*args)
