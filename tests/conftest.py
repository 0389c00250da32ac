"""Shared fixtures: offline, seeded, tiny."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

# seeded like every other test: the same examples on every run (no flaky CI)
hypothesis_settings.register_profile("medfed", derandomize=True, deadline=None)
hypothesis_settings.load_profile("medfed")

from medfed.crypto.context import (  # noqa: E402
    load_public_context,
    make_secret_context,
    public_context_bytes,
)
from medfed.crypto.params import PRESETS  # noqa: E402
from medfed.fl.workspace import HospitalData  # noqa: E402


@pytest.fixture(scope="session")
def params():
    return PRESETS["fast"]


@pytest.fixture(scope="session")
def keys(params):
    """(hospital secret context, aggregator public context)."""
    secret = make_secret_context(params)
    return secret, load_public_context(public_context_bytes(secret))


def synthetic_hospitals(
    n_hospitals: int = 3, n: int = 240, d: int = 12, n_classes: int = 2, seed: int = 0
) -> list[HospitalData]:
    """Linearly separable-ish data split over hospitals (features are raw, unnormalized)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, n_classes))

    def sample(m: int):
        x = rng.normal(loc=3.0, scale=2.0, size=(m, d))
        y = np.argmax((x - 3.0) @ w + 0.3 * rng.normal(size=(m, n_classes)), axis=1)
        return x, y.astype(np.int64)

    xtr, ytr = sample(n)
    xte, yte = sample(n // 2)
    tr = np.array_split(np.arange(n), n_hospitals)
    te = np.array_split(np.arange(n // 2), n_hospitals)
    return [
        HospitalData(f"hospital-{i}", xtr[a], ytr[a], xte[b], yte[b])
        for i, (a, b) in enumerate(zip(tr, te, strict=True))
    ]


def linear_hospitals(n: int, d: int, k: int = 3, label_noise: float = 1.0) -> list[HospitalData]:
    """``n`` train and ``n`` test samples of ``d`` standard normal features, labels from a
    random linear rule plus ``label_noise`` normal noise, split over ``k`` hospitals (seeded);
    with ``d`` near ``n`` a head can memorize its training set."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=d)

    def sample(m):
        x = rng.normal(size=(m, d))
        return x, (x @ w / np.sqrt(d) + label_noise * rng.normal(size=m) > 0).astype(np.int64)

    (xtr, ytr), (xte, yte) = sample(n), sample(n)
    tr, te = np.array_split(np.arange(n), k), np.array_split(np.arange(n), k)
    return [
        HospitalData(f"hospital-{i}", xtr[a], ytr[a], xte[b], yte[b])
        for i, (a, b) in enumerate(zip(tr, te, strict=True))
    ]


@pytest.fixture
def make_hospitals():
    return synthetic_hospitals
