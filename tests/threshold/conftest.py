"""Fixtures for the OpenFHE threshold tests (Python 3.10 environment, see README.md here).

Nothing here imports OpenFHE at import time, so the main (3.11) test run can collect this
directory and skip test_threshold.py cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class Federation:
    """n hospitals after setup: context, joint key chain and (optionally) Shamir sharing."""

    context: object
    parties: list
    joint_public_key: bytes
    aggregator: object

    def party(self, index: int):
        return self.parties[index - 1]


def make_federation(params, *, share: bool = True) -> Federation:
    from medfed.crypto.threshold import ThresholdAggregator, ThresholdContext, ThresholdParty

    lead_context = ThresholdContext.generate(params)
    wire = lead_context.to_bytes()  # what the lead hospital publishes
    parties = [
        ThresholdParty(lead_context if i == 1 else ThresholdContext.from_bytes(wire), i)
        for i in range(1, params.parties + 1)
    ]
    bundles = {p.index: p.public_bundle for p in parties}
    for p in parties:
        p.set_peers(bundles)
    running = None
    for p in parties:  # the key chain, relayed by the aggregator
        running = p.keygen(running)
    for p in parties:
        p.set_joint_public_key(running)
    if share:
        outbox = {p.index: p.share_key() for p in parties}
        for p in parties:
            for sender, sealed in outbox.items():
                if sender != p.index:
                    p.accept_key_share(sender, sealed[p.index])
    aggregator = ThresholdAggregator(wire, running)
    return Federation(lead_context, parties, running, aggregator)


@pytest.fixture(scope="session")
def federation():
    """The :func:`make_federation` factory."""
    return make_federation


@pytest.fixture(scope="module")
def test_params():
    from medfed.crypto.threshold import THRESHOLD_PRESETS

    return THRESHOLD_PRESETS["test"]


@pytest.fixture(scope="module")
def fed3(test_params):
    """3 hospitals, t = 2, smallest 128-bit ring, Shamir shares distributed."""
    return make_federation(test_params.with_parties(3, 2))


@pytest.fixture(scope="module")
def fed5(test_params):
    """5 hospitals, t = 3."""
    return make_federation(test_params.with_parties(5, 3))
