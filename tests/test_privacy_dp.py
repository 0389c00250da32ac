"""Mode "updates" with differential privacy: the sensitivity bounds hold, the noise shares add
up, the reported epsilon meets the target, and privacy costs accuracy while the membership
attack falls to chance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import medfed
from medfed.config import ConfigError
from medfed.privacy import mechanisms
from medfed.privacy.mechanisms import STATS_SENSITIVITY, HospitalDP, unit_rows
from medfed.train.local import train_local, train_local_dp
from medfed.train.normalization import stats_vector
from tests.conftest import linear_hospitals


def _neighbours(seed: int, n: int = 40, d: int = 6):
    """Two datasets that differ in one record (replace-one)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 3
    y = rng.integers(0, 2, n)
    x2, y2 = x.copy(), y.copy()
    x2[0] = rng.normal(size=d) * 3
    y2[0] = 1 - y[0]
    return x, y, x2, y2


@pytest.mark.parametrize("seed", range(5))
def test_one_record_moves_a_noise_free_step_and_the_stats_within_their_bounds(seed):
    x, y, x2, y2 = _neighbours(seed)
    clip = 0.5
    w0 = np.random.default_rng(seed).normal(size=(x.shape[1] + 1, 1))
    quiet = np.random.default_rng(0)  # noise_std 0: the clipped gradient sum alone
    a = train_local_dp(w0, x, y, 2, 1, 1.0, 0.0, clip, 0.0, quiet)
    b = train_local_dp(w0, x2, y2, 2, 1, 1.0, 0.0, clip, 0.0, quiet)
    assert len(x) * np.linalg.norm(a - b) <= 2 * clip + 1e-12  # the summed gradient: 2 clip
    u, u2 = unit_rows(x), unit_rows(x2)
    for components in (0, 4):
        s, s2 = stats_vector(u, components), stats_vector(u2, components)
        assert np.linalg.norm(s - s2) <= STATS_SENSITIVITY
        assert s[-1] == s2[-1]  # the count is the same (replace-one)


def test_dp_training_adds_fresh_noise_and_matches_plain_training_without_it():
    x, y, _, _ = _neighbours(0)
    w0 = np.zeros((x.shape[1] + 1, 1))
    plain = train_local(w0, x, y, 2, 5, 0.5, 0.0)
    huge_clip = train_local_dp(w0, x, y, 2, 5, 0.5, 0.0, 1e9, 0.0, np.random.default_rng(0))
    assert np.allclose(plain, huge_clip)
    dp = HospitalDP(noise_multiplier=1.0, contributors=3, clip=1.0, steps=5)
    one = train_local_dp(w0, x, y, 2, 5, 0.5, 0.0, 1.0, dp.step_std(), dp.rng())
    two = train_local_dp(w0, x, y, 2, 5, 0.5, 0.0, 1.0, dp.step_std(), dp.rng())
    assert not np.allclose(one, two)


def test_rows_are_unit_norm():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    assert np.allclose(np.linalg.norm(unit_rows(x), axis=1), [1, 0, 1])


def test_noise_shares_of_k_hospitals_add_up_to_the_full_noise():
    dp = HospitalDP(noise_multiplier=2.0, contributors=4, clip=1.0, steps=1)
    total = sum(dp.noise(dp.stats_std(), 200_000) for _ in range(4))
    assert np.std(total) == pytest.approx(2.0 * STATS_SENSITIVITY, rel=0.01)
    assert not np.array_equal(dp.noise(1.0, 4), dp.noise(1.0, 4))  # fresh every time


def test_dp_is_refused_where_the_knobs_conflict():
    with pytest.raises(ConfigError, match="dp_clip"):
        medfed.SimulationConfig(mode="updates", dp_epsilon=1.0, dp_clip=0.0)
    with pytest.raises(ConfigError, match="not both"):
        medfed.SimulationConfig(mode="updates", dp_epsilon=1.0, dp_noise=2.0)


def test_smaller_epsilon_costs_accuracy_and_takes_the_attack_to_chance(monkeypatch):
    seeds = itertools.count(1)  # deterministic noise, for a reproducible test only
    monkeypatch.setattr(mechanisms.secrets, "randbits", lambda bits: next(seeds))
    hospitals = linear_hospitals(200, 200)  # as many features as samples: it memorizes
    runs = {}
    for eps in (None, 10.0, 1.0):
        cfg = medfed.SimulationConfig(
            mode="updates", keys="none", rounds=10, local_epochs=20, lr=3.5, l2=0.0,
            components=0, dp_epsilon=eps, dp_clip=5.0, backend="local", progress=False,
        )  # fmt: skip
        runs[eps] = medfed.federate(cfg, hospitals)
    assert runs[None]["dp"] is None and runs[None]["mia_auc"] > 0.65  # it memorized
    assert runs[1.0]["dp"]["epsilon"] <= 1.0 and runs[10.0]["dp"]["epsilon"] <= 10.0
    assert runs[1.0]["dp"]["epsilon"] <= runs[1.0]["dp"]["epsilon_rdp"]
    assert runs[None]["accuracy"] > runs[10.0]["accuracy"] > runs[1.0]["accuracy"]
    advantage = runs[None]["mia_auc"] - 0.5
    for eps in (10.0, 1.0):  # the attack loses at least half its advantage (AUC std ~0.03)
        assert abs(runs[eps]["mia_auc"] - 0.5) < advantage / 2
        assert runs[eps]["leakage"]["released_head"]["epsilon"] == runs[eps]["dp"]["epsilon"]
    # the non-private yardsticks stand beside it
    assert runs[1.0]["plaintext_accuracy"] == runs[None]["plaintext_accuracy"]
