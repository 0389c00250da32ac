"""Mode "updates" with differential privacy: the sensitivity bounds hold, the noise shares add
up, the reported epsilon meets the target, and privacy costs accuracy while the membership
attack falls to chance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import medfed
from medfed.config import ConfigError
from medfed.fl.workspace import HospitalData
from medfed.privacy import mechanisms
from medfed.privacy.mechanisms import (
    STATS_SENSITIVITY,
    UpdatesDP,
    clip_rows,
    max_stable_lr,
    unit_rows,
    update_sensitivity,
)
from medfed.train.local import train_local, weighted_update
from medfed.train.normalization import stats_vector


def _neighbours(seed: int, n: int = 40, d: int = 6):
    """Two datasets that differ in one record (replace-one), unit-norm features."""
    rng = np.random.default_rng(seed)
    x = clip_rows(rng.normal(size=(n, d)) * 3, 1.0)
    y = rng.integers(0, 2, n)
    x2, y2 = x.copy(), y.copy()
    x2[0] = clip_rows(rng.normal(size=(1, d)) * 3, 1.0)[0]
    y2[0] = 1 - y[0]
    return x, y, x2, y2


@pytest.mark.parametrize("seed", range(5))
def test_one_record_moves_the_weighted_update_and_the_stats_within_their_bounds(seed):
    x, y, x2, y2 = _neighbours(seed)
    epochs, l2 = 10, 0.01
    lr = max_stable_lr(l2)  # the largest step the bound allows
    w0 = np.random.default_rng(seed).normal(size=(x.shape[1] + 1, 1))
    a = weighted_update(train_local(w0, x, y, 2, epochs, lr, l2), len(x))
    b = weighted_update(train_local(w0, x2, y2, 2, epochs, lr, l2), len(x))
    assert np.linalg.norm(a - b) <= update_sensitivity(epochs, lr, heads=1)
    u, u2 = unit_rows(x), unit_rows(x2)
    for components in (0, 4):
        s, s2 = stats_vector(u, components), stats_vector(u2, components)
        assert np.linalg.norm(s - s2) <= STATS_SENSITIVITY
        assert s[-1] == s2[-1]  # the count is the same (replace-one)


def test_rows_are_unit_norm_or_clipped_to_it():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    assert np.allclose(np.linalg.norm(unit_rows(x), axis=1), [1, 0, 1])
    assert np.allclose(np.linalg.norm(clip_rows(x, 1.0), axis=1), [1, 0, 0.5])


def test_noise_shares_of_k_hospitals_add_up_to_the_full_noise():
    dp = UpdatesDP(noise_multiplier=2.0, contributors=4)
    total = sum(dp.noise(dp.stats_std(), 200_000) for _ in range(4))
    assert np.std(total) == pytest.approx(2.0 * STATS_SENSITIVITY, rel=0.01)
    assert not np.array_equal(dp.noise(1.0, 4), dp.noise(1.0, 4))  # fresh every time


def test_dp_is_refused_where_the_bound_fails_or_the_mode_lacks_it():
    with pytest.raises(ConfigError, match="mode 'updates' only"):
        medfed.SimulationConfig(dp_epsilon=1.0)
    with pytest.raises(ConfigError, match="lr <= 2"):
        medfed.SimulationConfig(mode="updates", dp_epsilon=1.0, lr=8.0)
    with pytest.raises(ConfigError, match="not both"):
        medfed.SimulationConfig(mode="updates", dp_epsilon=1.0, dp_noise=2.0)


def _overfittable(n: int = 200, d: int = 200, k: int = 3) -> list[HospitalData]:
    """Noisy labels, as many features as samples: a head can memorize its training set."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=d)

    def sample(m):
        x = rng.normal(size=(m, d))
        return x, (x @ w / np.sqrt(d) + rng.normal(size=m) > 0).astype(np.int64)

    (xtr, ytr), (xte, yte) = sample(n), sample(n)
    tr, te = np.array_split(np.arange(n), k), np.array_split(np.arange(n), k)
    return [
        HospitalData(f"hospital-{i}", xtr[a], ytr[a], xte[b], yte[b])
        for i, (a, b) in enumerate(zip(tr, te, strict=True))
    ]


def test_smaller_epsilon_costs_accuracy_and_takes_the_attack_to_chance(monkeypatch):
    seeds = itertools.count(1)  # deterministic noise, for a reproducible test only
    monkeypatch.setattr(mechanisms.secrets, "randbits", lambda bits: next(seeds))
    hospitals = _overfittable()
    runs = {}
    for eps in (None, 10.0, 1.0):
        cfg = medfed.SimulationConfig(
            mode="updates", keys="none", rounds=10, local_epochs=20, lr=3.5, l2=0.0,
            components=0, dp_epsilon=eps, backend="local", progress=False,
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
