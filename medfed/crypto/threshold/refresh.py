"""The collective refresh with every party in one process (tests, benchmarks, local runs).

:class:`InProcessRefresher` runs the protocol of "Collective refresh" in
docs/threshold-protocol.md message by message, as bytes: the aggregator's
:meth:`~medfed.crypto.threshold.ThresholdAggregator.refresh_input`, the lead's (party 1, or
the lowest online party) :meth:`~medfed.crypto.threshold.ThresholdParty.refresh_element`,
every online party's
:meth:`~medfed.crypto.threshold.ThresholdParty.refresh_shares` (a party that recovered a
dropped party's key share answers for it too), the aggregator's
:meth:`~medfed.crypto.threshold.ThresholdAggregator.refresh_output`.
"""

from __future__ import annotations

from collections.abc import Sequence

from medfed.crypto.threshold.aggregator import ThresholdAggregator
from medfed.crypto.threshold.party import ThresholdParty


class InProcessRefresher:
    """Refreshes ciphertexts with ``parties`` (``online``: the ones still there)."""

    def __init__(
        self,
        aggregator: ThresholdAggregator,
        parties: Sequence[ThresholdParty],
        online: Sequence[ThresholdParty] | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.online = list(online if online is not None else parties)
        self.lead = min(self.online, key=lambda p: p.index)  # party 1, or the lowest online
        self.rounds = 0  # ciphertexts refreshed
        self.bytes_per_party = 0  # what one party received (c1, a) and sent (its shares)

    def refresh(self, ciphertexts: list[bytes], step: int) -> list[bytes]:
        """Fresh top-level encryptions of the same values, in order."""
        out = []
        for blob in ciphertexts:
            self.rounds += 1
            adjusted, c1 = self.aggregator.refresh_input(blob)
            a, sealed = self.lead.refresh_element(round=self.rounds)
            shares = [
                p.refresh_shares(
                    c1,
                    a,
                    round=self.rounds,
                    sealed_digest=sealed.get(p.index),
                    lead=self.lead.index,
                )
                for p in self.online
            ]
            self.bytes_per_party += len(c1) + len(a) + len(shares[-1])
            out.append(self.aggregator.refresh_output(adjusted, a, shares))
        return out
